"""Training job: a short real run on a tiny ImageFolder, then eval and predict on its
checkpoint; exact resume; atomic checkpoints; the resume-mismatch refusal."""
from __future__ import annotations

import json

import pytest
import torch

from transnext.cli import main
from transnext.engine.checkpointing import save_atomic


def train_args(data, out, model, *extra):
    return ["train", "--model", model, "--data-dir", str(data), "--output", str(out),
            "--input-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--no-tensorboard", "--deterministic", "--seed", "0", "--lr", "1e-3",
            "--warmup-epochs", "0", *extra]


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory, model_name):
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(tiny_folder, out, model_name, "--epochs", "2")) == 0
    return out


def test_train_writes_checkpoints_and_logs(trained, model_name):
    for name in ("last.pth", "best.pth", "metrics.csv", "metrics.json"):
        assert (trained / name).is_file(), name
    ck = torch.load(trained / "last.pth", map_location="cpu", weights_only=True)
    assert ck["model_name"] == model_name
    assert ck["num_classes"] == 3 and ck["class_names"] == ["cat", "dog", "fish"]
    assert ck["epoch"] == 1 and ck["step"] == 6  # 24 images / batch 8 = 3 steps per epoch
    for key in ("optimizer", "scheduler", "rng", "args", "model"):
        assert ck[key] is not None, key
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    rows = json.loads((trained / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[-1]["val_count"] == 9 and 0 <= rows[-1]["val_top1"] <= 100
    assert (trained / "metrics.csv").read_text().count("\n") == 3


def test_eval_and_predict_on_checkpoint(trained, tiny_folder, model_name, tmp_path, capsys):
    js = tmp_path / "eval.json"
    assert main(["eval", "--model", model_name, "--checkpoint", str(trained / "last.pth"),
                 "--data-dir", str(tiny_folder), "--input-size", "32", "40", "--workers", "0",
                 "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert [r["input_size"] for r in res["rows"]] == [32, 40]
    assert all(r["count"] == 9 for r in res["rows"])
    out = capsys.readouterr().out
    assert "| 32 | default |" in out and "| 40 | default |" in out
    # the eval table's number is the training run's own validation number
    rows = json.loads((trained / "metrics.json").read_text())
    assert res["rows"][0]["top1"] == pytest.approx(rows[-1]["val_top1"])

    img = sorted((tiny_folder / "val" / "dog").iterdir())[0]
    assert main(["predict", str(img), "--model", model_name, "--checkpoint",
                 str(trained / "last.pth"), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    assert str(img) in out
    assert all(name in out for name in ("cat", "dog", "fish"))  # its own class names


def test_linear_mode_eval(trained, tiny_folder, model_name, tmp_path):
    js = tmp_path / "lin.json"
    assert main(["eval", "--model", model_name, "--checkpoint", str(trained / "last.pth"),
                 "--data-dir", str(tiny_folder), "--input-size", "32", "--fixed-pool-size", "1",
                 "--both-modes", "--workers", "0", "--json", str(js)]) == 0
    modes = [r["mode"] for r in json.loads(js.read_text())["rows"]]
    assert modes == ["default", "linear (pool 1)"]


def test_resume_matches_uninterrupted(tiny_folder, tmp_path, model_name):
    """Stop after epoch 1 of 3 and resume: the final weights equal a straight 3-epoch run
    (random crops, flips and mixup included, so every RNG has to be restored; one
    persistent loader worker, whose RNG must not carry over from epoch to epoch)."""
    extra = ["--epochs", "3", "--mixup", "0.2", "--drop-path", "0.1", "--workers", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(tiny_folder, a, model_name, *extra)) == 0
    assert main(train_args(tiny_folder, b, model_name, *extra, "--stop-after-epochs", "1")) == 0
    assert torch.load(b / "last.pth", weights_only=True)["epoch"] == 0
    assert main(train_args(tiny_folder, b, model_name, *extra, "--resume",
                           str(b / "last.pth"))) == 0
    ca = torch.load(a / "last.pth", weights_only=True)
    cb = torch.load(b / "last.pth", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == cb["step"]
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    rows = json.loads((b / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_resume_mismatch_is_refused(trained, tiny_folder, tmp_path, model_name, capsys):
    rc = main(train_args(tiny_folder, tmp_path, model_name, "--epochs", "3", "--num-classes",
                         "5", "--resume", str(trained / "last.pth")))
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "3 classes" in err and "5 classes" in err
    rc = main(train_args(tiny_folder, tmp_path, "test_vit", "--epochs", "3", "--resume",
                         str(trained / "last.pth")))
    assert rc == 2
    assert f"holds model '{model_name}'" in capsys.readouterr().err


def test_fine_tune_into_new_class_count(trained, tmp_path, model_name):
    """--pretrained from a checkpoint with 3 classes into a 4-class problem."""
    from conftest import make_image_folder
    data = tmp_path / "data"
    make_image_folder(data / "train", ["a", "b", "c", "d"], 2, seed=5)
    out = tmp_path / "ft"
    assert main(train_args(data, out, model_name, "--epochs", "1", "--pretrained",
                           str(trained / "last.pth"))) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["num_classes"] == 4 and ck["model"]["head.weight"].shape[0] == 4
    src = torch.load(trained / "last.pth", weights_only=True)["model"]
    # the backbone started from the checkpoint: after one small-lr epoch it is still close
    k = "patch_embed1.proj.weight"
    assert (ck["model"][k] - src[k]).abs().max() < 0.05


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomic({"epoch": 2, "bad": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left


def test_ctrl_c_during_save_finishes_the_file_first(tmp_path):
    """Ctrl-C in the middle of torch.save (here: while pickling) must not leave a
    half-written file or turn into the zip writer's RuntimeError; the write completes
    and the interrupt is raised after it."""
    import os
    import signal

    class CtrlC:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGINT)
            return (int, (5,))

    path = tmp_path / "ck.pth"
    # pytest may have inherited an ignored SIGINT (started in the background)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_atomic({"w": torch.randn(1000, 100), "late": CtrlC(), "after": 7}, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    ck = torch.load(path, weights_only=False)  # our own file; it pickles a plain int()
    assert ck["late"] == 5 and ck["after"] == 7 and ck["w"].shape == (1000, 100)


def test_fashion_mnist_fast_path_training(tmp_path, capsys):
    """The Fashion-MNIST tensor path (a slice of the real set) through the CLI."""
    from transnext.data.fashion_mnist import DEFAULT_DIRS
    from pathlib import Path
    if not Path(DEFAULT_DIRS[0]).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path / "fm"
    assert main(["train", "--recipe", "fmnist-femto", "--epochs", "1", "--limit-train", "256",
                 "--limit-val", "128", "--batch-size", "64", "--output", str(out),
                 "--no-progress", "--no-tensorboard"]) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["class_names"][0] == "T-shirt/top" and ck["in_chans"] == 1
    assert ck["metrics"]["val_count"] == 128


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_accumulation_ema_clip(tiny_folder, tmp_path, model_name, amp):
    out = tmp_path / amp
    assert main(train_args(tiny_folder, out, model_name, "--epochs", "1", "--amp", amp,
                           "--accum-steps", "2", "--ema", "--clip-grad", "1.0")) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["step"] == 2  # 3 batches, accumulated in pairs: updates after batch 2 and 3
    assert ck["model_ema"] is not None
    assert (ck["scaler"] is not None) == (amp == "fp16")
    assert "val_ema_top1" in ck["metrics"]


def test_ctrl_c_keeps_last_epoch_and_resume_continues(tiny_folder, tmp_path, model_name):
    """Interrupt a real training process after its first checkpoint: the checkpoint is
    intact, the process says how to resume, and --resume finishes the run."""
    import signal
    import subprocess
    import time
    from conftest import PY, REPO, subprocess_env
    out = tmp_path / "run"
    args = train_args(tiny_folder, out, model_name, "--epochs", "400")
    # A parent started in the background may ignore SIGINT, and children inherit that.
    p = subprocess.Popen([PY, "-m", "transnext", *args], cwd=REPO, env=subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not (out / "last.pth").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert (out / "last.pth").exists(), p.stderr.read() if p.poll() is not None else ""
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "interrupted during epoch" in err and "--resume" in err
    ck = torch.load(out / "last.pth", weights_only=True)
    done = ck["epoch"]
    assert done >= 0
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    resume = train_args(tiny_folder, out, model_name, "--epochs", str(done + 2), "--resume",
                        str(out / "last.pth"))
    assert main(resume) == 0
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == done + 1


def test_pretrained_of_another_model_is_refused(trained, tiny_folder, tmp_path, capsys):
    rc = main(train_args(tiny_folder, tmp_path, "transnext_micro", "--epochs", "1",
                         "--pretrained", str(trained / "last.pth")))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"pretrained checkpoint {trained / 'last.pth'}" in err and "Traceback" not in err


def test_repeated_augmentation_sampler(tmp_path, model_name, caplog):
    """--repeated-aug uses timm's RepeatAugSampler (whole rounds of 256 samples), and
    falls back to the plain sampler, with a warning, on sets too small for it."""
    import logging
    from conftest import make_image_folder
    from transnext.engine import recipes
    from transnext.engine.distributed import DistInfo
    from transnext.engine.loaders import build_train_data
    from transnext.cli import build_parser
    from timm.data.distributed_sampler import RepeatAugSampler
    data = make_image_folder(tmp_path / "d" / "train", ["a", "b"], 130, size=8,
                             ext_cycle=(".png",))
    args = build_parser().parse_args(["train", "--model", model_name, "--data-dir",
                                      str(data.parent), "--repeated-aug", "--batch-size", "16",
                                      "--workers", "0", "--input-size", "8", "--no-verify"])
    recipes.resolve(args)
    dcfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    train, _, _, _ = build_train_data(args, DistInfo(), dcfg)
    # (the loader's sampler wraps it to hand (epoch, index) pairs to the seeded dataset)
    assert isinstance(train.sampler.sampler, RepeatAugSampler) and len(train.sampler) == 256
    args.batch_size = 512
    with caplog.at_level(logging.WARNING):
        train, _, _, _ = build_train_data(args, DistInfo(), dcfg)
    assert (not isinstance(train.sampler.sampler, RepeatAugSampler)
            and "repeated augmentation" in caplog.text)
