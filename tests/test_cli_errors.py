"""Bad input on the command line: one line naming the flag, the value and what is
allowed, exit status 2, nothing written. The cases of issue 15 run the real console
script (several at a time); the families (every checked flag of every subcommand) run
through ``main()`` in this process, generated from the parser so new subcommands are
covered too."""
from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_image_folder, subprocess_env
from transnext import cli_checks
from transnext.cli import _on_purpose, build_parser, main

EXE = Path(sys.executable).parent / "transnext"
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "transnext"]


def run_many(cases: dict[str, list[str]], umask: int | None = None) -> dict:
    """Run the console script once per case, two at a time (each start imports torch)."""
    def one(argv):
        pre = (lambda: os.umask(umask)) if umask is not None else None
        return subprocess.run(CMD + argv, capture_output=True, text=True, cwd=REPO,
                              env=subprocess_env(), timeout=300, preexec_fn=pre)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(one, cases.values())))
    return results


def assert_one_line(p, command: str, *needles: str) -> str:
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert err[0].startswith(f"transnext {command}: error: "), err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    assert "weights_only" not in err[0] and "\x1b" not in err[0]
    return err[0]


class Payload:
    """Unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo unpickled",))


class UserThing:
    def __init__(self):
        self.x = 1


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_name):
    """A tiny image folder, a finished one-epoch run of the console script, and bad files."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = make_image_folder(root / "data" / "train", ["a", "b"], 4, size=16).parent
    make_image_folder(data / "val", ["a", "b"], 2, size=16, seed=3)
    run = root / "run"
    p = run_many({"train": [
        "train", "--model", model_name, "--data-dir", str(data), "--output", str(run),
        "--epochs", "1", "--batch-size", "4", "--input-size", "16", "--workers", "0",
        "--no-progress", "--no-tensorboard", "--train-aug", "none", "--no-verify"]},
        umask=0o027)["train"]
    assert p.returncode == 0, p.stderr[-3000:]
    sd = torch.load(run / "last.pth", weights_only=True)["model"]
    bad = {}
    for name, extra, proto in (("payload4", Payload(), 4), ("payload2", Payload(), 2),
                               ("userclass", UserThing(), 2)):
        bad[name] = root / f"{name}.pth"
        torch.save({"model": sd, "args": extra}, bad[name], pickle_protocol=proto)
    bad["random"] = root / "random.pth"
    bad["random"].write_bytes(bytes(range(256)) * 8)
    bad["truncated"] = root / "truncated.pth"
    bad["truncated"].write_bytes((run / "last.pth").read_bytes()[:5000])
    return {"data": data, "run": run, "img": data / "val" / "a" / "img_0.png", **bad}


@pytest.mark.slow
def test_numeric_flags_refused_before_any_work(files, tmp_path, model_name):
    out = tmp_path / "never"
    train = ["train", "--model", model_name, "--data-dir", str(files["data"]),
             "--output", str(out)]
    ck = str(files["run"] / "last.pth")
    ev = ["eval", "--model", model_name, "--checkpoint", ck, "--data-dir", str(files["data"])]
    pr = ["predict", str(files["img"]), "--model", model_name, "--checkpoint", ck]
    cases = {
        "train input 0": train + ["--input-size", "0"],
        "train batch 0": train + ["--batch-size", "0"],
        "train epochs -1": train + ["--epochs", "-1"],
        "eval input 0": ev + ["--input-size", "32", "0"],
        "eval pool 0": ev + ["--fixed-pool-size", "0"],
        "predict input 0": pr + ["--input-size", "0"],
        "info unknown": ["info", "transnext_nope"],
        "train unknown model": train[:2] + ["no_such_net"] + train[3:],
    }
    r = run_many(cases)
    assert_one_line(r["train input 0"], "train", "--input-size", "'0'", "1 or more")
    assert_one_line(r["train batch 0"], "train", "--batch-size", "'0'")
    assert_one_line(r["train epochs -1"], "train", "--epochs", "'-1'")
    assert_one_line(r["eval input 0"], "eval", "--input-size", "'0'")
    assert_one_line(r["eval pool 0"], "eval", "--fixed-pool-size", "'0'")
    assert_one_line(r["predict input 0"], "predict", "--input-size", "'0'")
    assert_one_line(r["info unknown"], "info", "'transnext_nope'", "transnext_femto")
    assert_one_line(r["train unknown model"], "train", "--model", "'no_such_net'")
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_checkpoint_refusals_name_the_cause(files, tmp_path, model_name):
    ev = ["eval", "--model", model_name, "--data-dir", str(files["data"]), "--checkpoint"]
    cases = {k: ev + [str(files[k])] for k in
             ("payload4", "payload2", "userclass", "random", "truncated")}
    cases["pretrained"] = ["train", "--model", model_name, "--data-dir", str(files["data"]),
                           "--output", str(tmp_path / "o"), "--pretrained",
                           str(files["payload4"])]
    cases["other model"] = ["eval", "--model", "transnext_micro", "--data-dir",
                            str(files["data"]), "--checkpoint", str(files["run"] / "last.pth")]
    r = run_many(cases)
    for k in ("payload4", "payload2"):
        line = assert_one_line(r[k], "eval", f"refusing to load {files[k]}", "posix.system")
        assert "unpickled" not in r[k].stdout + r[k].stderr  # nothing ran
    assert_one_line(r["userclass"], "eval", "refusing to load", "UserThing")
    assert_one_line(r["random"], "eval", f"{files['random']} is not a checkpoint file")
    assert_one_line(r["truncated"], "eval", f"{files['truncated']} is truncated or damaged")
    assert_one_line(r["pretrained"], "train", "refusing to load", "posix.system")
    assert_one_line(r["other model"], "eval", f"holds model '{model_name}'",
                    f"--model {model_name}")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_run_files_follow_the_umask(files):
    """The run above was made under umask 027: checkpoints 0640 like the metrics."""
    for name in ("last.pth", "best.pth", "metrics.json", "metrics.csv"):
        mode = stat.S_IMODE((files["run"] / name).stat().st_mode)
        assert mode == 0o640, (name, oct(mode))
    assert not list(files["run"].glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.slow
def test_combinations_and_silent_cases(files, tmp_path, model_name):
    ck = str(files["run"] / "last.pth")
    ev = ["eval", "--model", model_name, "--data-dir", str(files["data"])]
    cases = {
        "eval no ckpt": ev,
        "predict no ckpt": ["predict", str(files["img"]), "--model", model_name],
        "both modes": ev + ["--checkpoint", ck, "--both-modes"],
        "predict dir": ["predict", str(files["data"]), "--model", model_name,
                        "--checkpoint", ck],
        "resume finished": ["train", "--model", model_name, "--data-dir", str(files["data"]),
                            "--output", str(files["run"]), "--epochs", "1",
                            "--resume", ck, "--input-size", "16", "--workers", "0"],
        "use ema": ev + ["--checkpoint", ck, "--use-ema", "--workers", "0"],
    }
    r = run_many(cases)
    assert_one_line(r["eval no ckpt"], "eval", "--checkpoint is required", "random weights")
    assert_one_line(r["predict no ckpt"], "predict", "--checkpoint is required")
    assert_one_line(r["both modes"], "eval", "--both-modes", "--fixed-pool-size")
    assert_one_line(r["predict dir"], "predict", f"{files['data']} is a folder")
    assert_one_line(r["resume finished"], "train", "finished 1 epoch", "--epochs is 1",
                    "larger --epochs")
    assert_one_line(r["use ema"], "eval", "--use-ema", "no EMA weights")


@pytest.mark.parametrize("argv,needles", [
    (["train", "--opt", "adamw", "--momentum", "0.9"], ["--momentum", "--opt adamw"]),
    (["train", "--ema-decay", "0.99"], ["--ema-decay", "without --ema"]),
    (["train", "--mixup-prob", "0.5"], ["--mixup-prob", "without --mixup"]),
    (["train", "--train-aug", "none", "--reprob", "0.2"], ["--reprob", "--train-aug none"]),
    (["train", "--dataset", "fashion-mnist", "--aa", "rand-m9"], ["--aa", "fashion-mnist"]),
    (["train", "--aa", "bogus-policy"], ["--aa 'bogus-policy'", "auto-augment"]),
    (["train", "--sched", "cosin"], ["--sched 'cosin'", "cosine"]),
    (["train", "--opt", "adamx"], ["--opt 'adamx'"]),
    (["train", "--in-chans", "2"], ["--in-chans 2", "grayscale (1) or RGB (3)"]),
    (["train", "--img-size", "64"], ["--img-size"]),
    (["train", "--resume", "CKPT", "--pretrained", "CKPT"], ["--resume", "drop --pretrained"]),
    (["train", "--resume", "CKPT", "--time-budget", "60"], ["--time-budget"]),
    (["eval", "--checkpoint", "CKPT", "--imagenet-a", "DATA"],
     ["--imagenet-a", "--suite robustness"]),
    (["eval", "--checkpoint", "CKPT", "--suite", "robustness"], ["--suite robustness needs"]),
    (["eval", "--checkpoint", "CKPT", "--dataset", "imagefolder", "NODATA"], ["nothing to "
                                                                            "evaluate"]),
])
def test_flag_combinations_refused_before_any_work(files, tmp_path, model_name, capsys,
                                                   argv, needles):
    out = tmp_path / "o"
    ck = str(files["run"] / "last.pth")
    argv = [ck if a == "CKPT" else str(files["data"]) if a == "DATA" else a for a in argv]
    command = argv[0]
    if "NODATA" in argv:
        argv.remove("NODATA")
    elif command in ("train", "eval"):
        argv += ["--data-dir", str(files["data"])]
    argv += ["--model", model_name] + (["--output", str(out)] if command == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"transnext {command}: error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()


# ---- families, in this process -------------------------------------------------------

BAD = {  # one value each check refuses, and a word its message must hold
    "positive_int": ("0", "1 or more"), "non_negative_int": ("-1", "0 or more"),
    "int_at_least_1": ("0", "1 or more"), "int_at_least_0": ("-1", "0 or more"),
    "positive_float": ("0", "above 0"), "non_negative_float": ("-0.5", "0 or more"),
    "probability": ("1.5", "between 0 and 1"), "below_one": ("1", "below 1"),
    "device_name": ("gpu0", "cuda"), "threads_value": ("0", "1 or more"),
    "existing_file": ("/no/such/file.pth", "not found"),
    "existing_dir": ("/no/such/folder", "not found"),
    "output_file": ("/", "folder"), "model_name": ("no_such_net", "unknown model"),
    "arch_name": ("no_such_net", "unknown model"),
}


def _checked_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.type is not None:
                yield command, action


def test_every_numeric_flag_is_checked():
    """No subcommand (today's or a new one) takes a bare int/float: every typed flag
    goes through a check that names what is allowed."""
    bare = [(c, a.option_strings[0]) for c, a in _checked_actions() if a.type in (int, float)]
    assert not bare, f"flags parsed with a bare int/float (use transnext.cli_checks): {bare}"


@pytest.mark.parametrize("command,option", [(c, a.option_strings[-1])
                                            for c, a in _checked_actions()
                                            if a.type.__name__ in BAD])
def test_every_checked_flag_refuses_a_bad_value(command, option, capsys):
    action = dict(((c, a.option_strings[-1]), a) for c, a in _checked_actions())[
        (command, option)]
    value, word = BAD[action.type.__name__]
    with pytest.raises(SystemExit) as e:  # refused as parsed, before required flags count
        main([command, option, value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"transnext {command}: error: argument {option}"), err
    assert value in err and word in err, err


def test_info_default_table_is_the_readme_table():
    from transnext.tools import info
    readme = (REPO / "README.md").read_text()
    table = re.findall(r"^\| `(transnext_\w+)` \|", readme, flags=re.M)
    assert list(info.DEFAULT) == table


def test_errors_on_purpose_vs_bugs():
    """A ValueError raised by the package's own checks is input; one from inside torch is
    a bug of ours and keeps its traceback."""
    import transnext
    with pytest.raises(ValueError) as ours:
        transnext.create_model("transnext_femto", in_chans=0)
    assert _on_purpose(ours.value)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.interpolate(torch.zeros(1, 1, 2), size=3, scale_factor=2.0)
    assert not _on_purpose(theirs.value)
    m = transnext.create_model("transnext_femto")
    from transnext.models.transnext import _tokens_to_map
    with pytest.raises(RuntimeError) as op:  # an op our code called failed: a bug
        _tokens_to_map(torch.zeros(2, 5, 3), 2, 2)
    assert Path(op.value.__traceback__.tb_next.tb_frame.f_code.co_filename).name == \
        "transnext.py"  # raised in our frame, by torch's reshape
    assert not _on_purpose(op.value)
    with pytest.raises(ValueError) as check:  # the model's input check
        m(torch.zeros(1, 3, 8, 8))
    assert _on_purpose(check.value)
    assert not _on_purpose(KeyError("x")) and not _on_purpose(RuntimeError("x"))
    assert _on_purpose(cli_checks.UsageError("x"))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(in_chans=0), "in_chans"), (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(num_classes=-1), "num_classes"), (dict(drop_rate=1.0), "drop_rate"),
    (dict(attn_drop_rate=-0.1), "attn_drop_rate"), (dict(window_size=4), "window_size"),
    (dict(depths=(1, 1, 3)), "one value per stage"), (dict(num_heads=(3, 2, 4, 8)),
                                                     "divisible"),
    (dict(mlp_ratios=(0, 4, 4, 4)), "mlp_ratios"), (dict(sr_ratios=(0, 2, 2, 1)),
                                                    "sr_ratios"),
    (dict(glu_recompute="yes"), "glu_recompute"), (dict(in_chans=True), "in_chans"),
])
def test_construction_refuses_values_that_can_only_fail_later(kwargs, needle):
    import transnext
    with pytest.raises(ValueError, match=needle):
        transnext.create_model("transnext_femto", **kwargs)


def test_compile_blocks_compiles_each_block_in_place():
    """--compile blocks: every TransNeXt block gets its own static-shape compile (the
    blocks of a stage share the compiled code); parameter names stay as they were."""
    import transnext
    from transnext.engine.errors import UserError
    from transnext.engine.models import compile_model
    from transnext.models.transnext import Block
    m = transnext.create_model("transnext_femto")
    keys = list(m.state_dict())
    assert compile_model(m, "blocks") is m
    blocks = [b for b in m.modules() if isinstance(b, Block)]
    assert len(blocks) == sum(m.depths)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert list(m.state_dict()) == keys
    with pytest.raises(UserError, match="no TransNeXt blocks"):
        compile_model(torch.nn.Linear(2, 2), "blocks")


@pytest.mark.parametrize("recipe", sorted(__import__("transnext.engine.recipes",
                                                      fromlist=["x"]).RECIPES))
def test_every_recipe_passes_the_checks_and_builds_its_schedule(recipe, tmp_path):
    """The presets go through the same checks as flags (the ft384 ones once named a
    scheduler timm does not have)."""
    import timm.optim
    from timm.scheduler import create_scheduler_v2
    from transnext.cli import _check_train
    args = build_parser().parse_args(["train", "--recipe", recipe, "--data-dir",
                                      str(tmp_path), "--output", str(tmp_path / "o")])
    _check_train(args)
    opt = timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr)
    sched, _ = create_scheduler_v2(opt, sched=args.sched, num_epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                   warmup_lr=args.warmup_lr, step_on_epochs=False,
                                   updates_per_epoch=10)
    assert sched is not None
    sched.step_update(num_updates=5)


def test_data_error_from_a_loader_worker_is_one_line(files, tmp_path, model_name, capsys):
    """A DataError raised in a DataLoader worker comes back wrapped in torch's text with
    the worker's traceback; the message is still the error's own line."""
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        (tmp_path / "val" / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["eval", "--model", model_name, "--checkpoint", str(files["run"] / "last.pth"),
                 "--data-dir", str(tmp_path), "--no-verify", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("transnext eval: error: no readable image near index"), err[-1]
    assert "Traceback" not in "\n".join(err) and "Caught DataError" not in err[-1]


def test_verbose_shows_the_traceback_of_an_input_error(files, model_name, capsys):
    assert main(["-v", "eval", "--model", model_name, "--checkpoint", str(files["random"]),
                 "--data-dir", str(files["data"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" in err
    assert err[-1].startswith("transnext eval: error: ") and "is not a checkpoint file" in err[-1]


def test_missing_optional_package_is_one_line(tmp_path, monkeypatch, capsys):
    """A job whose optional dependency is not installed names the package and the extra
    that installs it, instead of an internal-error traceback."""
    import sys

    from transnext.cli import main
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    rc = main(["det", "make-mosaics", "--output", str(tmp_path / "m"), "--train", "1",
               "--val", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pycocotools" in err and "transnext-pytorch[dense]" in err and "Traceback" not in err
