"""Segmentation data, metrics, inference modes and the `transnext seg` jobs on real
Fashion-MNIST mosaic files: training, eval, predict, convert, exact resume, torchrun."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (FMNIST, PY, REPO, graphs_follow_eager, needs_fmnist, run_ok, subprocess_env,
                      torchrun)
from transnext.cli import main
from transnext.data.fashion_mnist import DataError
from transnext.tasks.segmentation.data import SegDataset, shift_labels
from transnext.tasks.segmentation.inference import predict, slide, whole
from transnext.tasks.segmentation.metrics import SegMetric
from transnext.tasks.segmentation.model import build_upernet

@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    from transnext.tasks.common.mosaic import write_mosaic_set
    if not FMNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return write_mosaic_set(tmp_path_factory.mktemp("mosaics"), n_train=24, n_val=7, size=32)


def _mmseg_areas(preds, labels, n, ignore=255):
    """mmseg's intersect_and_union (histograms), summed over images."""
    tot = np.zeros((4, n))
    for p, l in zip(preds, labels):
        keep = l != ignore
        p, l = p[keep], l[keep]
        inter = p[p == l]
        ai = np.histogram(inter, bins=n, range=(0, n - 1))[0]
        ap = np.histogram(p, bins=n, range=(0, n - 1))[0]
        al = np.histogram(l, bins=n, range=(0, n - 1))[0]
        tot += np.stack([ai, ap + al - ai, ap, al])
    return tot


def test_metrics_dataset_wide_as_mmseg():
    rng = np.random.default_rng(0)
    n = 5
    preds = [rng.integers(0, n, (9, 13)), rng.integers(0, n - 1, (4, 7))]
    labels = [rng.integers(0, n - 1, (9, 13)), rng.integers(0, n - 1, (4, 7))]
    labels[0][:2] = 255
    m = SegMetric(n)
    for p, l in zip(preds, labels):
        m.update(torch.from_numpy(p), torch.from_numpy(l))
    res = m.compute()
    inter, union, _, lab = _mmseg_areas(preds, labels, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / lab
    assert res["mIoU"] == pytest.approx(np.nanmean(iou) * 100)
    assert res["mAcc"] == pytest.approx(np.nanmean(acc) * 100)
    assert res["aAcc"] == pytest.approx(inter.sum() / lab.sum() * 100)
    assert res["per_class"][4]["Acc"] is None and res["per_class"][4]["IoU"] == 0.0  # only predicted
    # not the mean of per-image mIoUs
    per_image = []
    for p, l in zip(preds, labels):
        mi = SegMetric(n)
        mi.update(torch.from_numpy(p), torch.from_numpy(l))
        per_image.append(mi.compute()["mIoU"])
    assert res["mIoU"] != pytest.approx(np.mean(per_image))


def test_ade20k_label_shift():
    assert shift_labels(np.array([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]


def _write_pair(root, split, name, img, mask, masks_dir="masks"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / masks_dir / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "images" / split / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / masks_dir / split / f"{name}.png")


def test_bad_data_one_message(tmp_path):
    img = np.zeros((8, 10, 3), np.uint8)
    ok = np.ones((8, 10), np.uint8)
    def fresh(name):
        root = tmp_path / name
        root.mkdir()
        (root / "classes.txt").write_text("bg\na\nb\n")
        _write_pair(root, "val", "good", img, ok)
        return root
    r = fresh("nomask")
    _write_pair(r, "val", "lonely", img, None)
    with pytest.raises(DataError, match=r"image .*lonely\.png has no mask"):
        SegDataset(r, "folder", "val")
    r = fresh("values")
    _write_pair(r, "val", "x", img, np.full((8, 10), 7, np.uint8))
    with pytest.raises(DataError, match=r"mask .*x\.png has values \[7\] outside the classes 0\.\.2"):
        SegDataset(r, "folder", "val")
    r = fresh("ignore_ok")
    _write_pair(r, "val", "x", img, np.full((8, 10), 255, np.uint8))
    assert len(SegDataset(r, "folder", "val")) == 2
    r = fresh("size")
    _write_pair(r, "val", "x", img, np.ones((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"image .*x\.png is 10x8 but its mask .*x\.png is 9x8"):
        SegDataset(r, "folder", "val")
    r = fresh("corrupt")
    (r / "images" / "val" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(ok).save(r / "masks" / "val" / "bad.png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png: corrupt"):
        SegDataset(r, "folder", "val")
    # ADE20K layout: values 0..150 valid (0 = ignored after the shift)
    r = tmp_path / "ade"
    _write_pair(r, "validation", "ADE_val_1", img, np.full((8, 10), 150, np.uint8), "annotations")
    ds = SegDataset(r, "ade20k", "val")
    assert ds.num_classes == 150 and ds.load(0)[1].unique().tolist() == [149]
    # the CLI: one line, exit 2
    r = fresh("cli")
    _write_pair(r, "val", "lonely", img, None)
    p = subprocess.run([PY, "-m", "transnext", "seg", "eval", "--checkpoint", str(tmp_path),
                        "--data-dir", str(r)], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("transnext seg: error:")


@pytest.fixture(scope="module")
def femto():
    torch.manual_seed(0)
    m = build_upernet("transnext_femto", 4, pos_bias="extrapolate", channels=16,
                      aux_channels=8).eval()
    # non-trivial BN statistics, so windows and scales differ visibly
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
    return m


@torch.no_grad()
def test_slide_and_multiscale_equal_whole_where_they_must(femto):
    x = torch.randn(2, 3, 37, 53)
    w = whole(femto, x)
    # one window covering the image (crop >= image): the whole-image logits
    assert torch.allclose(slide(femto, x, crop=64, stride=40), w, atol=1e-5)
    assert torch.allclose(slide(femto, x, crop=(37, 53), stride=10), w, atol=1e-5)
    # scale 1, no flip: the whole-image softmax
    assert torch.allclose(predict(femto, x), w.softmax(1), atol=1e-6)
    # odd sizes, several windows: each pixel's logits are the mean over its windows
    # (37 x 53, crop 24, stride 16: rows 0-24 and 13-37, columns 0-24, 16-40 and 29-53)
    s = slide(femto, x, crop=24, stride=16)
    a = whole(femto, x[:, :, 0:24, 0:24])
    b = whole(femto, x[:, :, 0:24, 16:40])
    assert torch.allclose(s[:, :, :13, :16], a[:, :, :13, :16], atol=1e-5)
    assert torch.allclose(s[:, :, :13, 16:24], (a[:, :, :13, 16:24] + b[:, :, :13, :8]) / 2,
                          atol=1e-5)
    # multi-scale + flip on an odd size: probabilities at the original size
    p = predict(femto, x, mode="slide", crop=24, stride=16, scales=(0.5, 0.75, 1.0, 1.75),
                flip=True)
    assert p.shape == (2, 4, 37, 53) and torch.allclose(p.sum(1), torch.ones(2, 37, 53))
    flipped = predict(femto, x.flip(-1), mode="slide", crop=24, stride=16,
                      scales=(0.5, 0.75, 1.0, 1.75), flip=True)
    assert torch.allclose(p, flipped.flip(-1), atol=1e-5)  # flip-averaging is flip-symmetric
    # test_scale: keep-ratio rescale then back to the original size
    p = predict(femto, x, test_scale=(100, 40))
    assert p.shape == (2, 4, 37, 53)


def _train_cmd(data, out, *extra):
    return ["seg", "train", "--recipe", "upernet-fmnist", "--data-dir", str(data), "--output",
            str(out), "--crop-size", "32", "--batch-size", "4", "--channels", "16",
            "--aux-channels", "8", "--workers", "0", "--no-progress", "--no-tensorboard",
            "--eval-batch-size", "4", "--seed", "3", "--deterministic", "--time-budget", "0",
            *extra]


@needs_fmnist
def test_train_eval_predict_convert_resume(mosaics, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_train_cmd(mosaics, a, "--iters", "6", "--ckpt-interval", "3")) == 0
    assert "val mIoU" in capsys.readouterr().out
    ref = torch.load(a / "last.pth", weights_only=True)
    assert ref["iter"] == 6 and (a / "metrics.csv").is_file()
    # exact resume: 3 iterations, stop, continue to 6 -> the same weights and optimizer state
    assert main(_train_cmd(mosaics, b, "--iters", "6", "--ckpt-interval", "3",
                           "--stop-after-iters", "3")) == 0
    assert torch.load(b / "last.pth", weights_only=True)["iter"] == 3
    assert main(_train_cmd(mosaics, b, "--iters", "6", "--ckpt-interval", "3",
                           "--resume", str(b / "last.pth"))) == 0
    got = torch.load(b / "last.pth", weights_only=True)
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    # eval, predict, convert on that checkpoint
    assert main(["seg", "eval", "--checkpoint", str(a / "last.pth"), "--data-dir", str(mosaics),
                 "--json", str(tmp_path / "e.json"), "--batch-size", "3"]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["pixels"] == 7 * 32 * 32 and 0 <= ev["mIoU"] <= 100
    assert abs(ev["mIoU"] - ref["metrics"]["val_mIoU"]) < 1e-6
    assert ev["inference"]["test_scale"] == [320, 80]  # the recipe's, kept by the checkpoint
    assert main(["seg", "eval", "--checkpoint", str(a / "last.pth"), "--data-dir", str(mosaics),
                 "--json", str(tmp_path / "e1.json"), "--test-scale", "32", "32"]) == 0
    assert json.loads((tmp_path / "e1.json").read_text())["inference"]["test_scale"] == [32, 32]
    img = mosaics / "images" / "val" / "00002.png"
    assert main(["seg", "predict", str(img), "--checkpoint", str(a / "last.pth"),
                 "--output", str(tmp_path / "pred"), "--mode", "slide", "--crop-size", "24",
                 "--stride", "16"]) == 0
    lab = np.array(Image.open(tmp_path / "pred" / "00002_labels.png"))
    assert lab.shape == (32, 32) and lab.max() <= 10
    assert Image.open(tmp_path / "pred" / "00002_overlay.png").size == (32, 32)
    assert main(["seg", "convert", str(a / "last.pth"), "--output", str(tmp_path / "hf")]) == 0
    assert main(["seg", "eval", "--checkpoint", str(tmp_path / "hf"), "--data-dir", str(mosaics),
                 "--json", str(tmp_path / "e2.json")]) == 0
    e2 = json.loads((tmp_path / "e2.json").read_text())
    assert e2["mIoU"] == pytest.approx(ev["mIoU"]) and e2["inference"] == ev["inference"]
    # the README's figure script on that checkpoint: 3 rows of 32-px tiles at 2x, a key of
    # the 11 classes wrapped to the width (lines of 22 px)
    fig = tmp_path / "fig.png"
    run_ok([PY, str(REPO / "scripts" / "figure_seg_demo.py"), "--checkpoint", str(a / "last.pth"),
            "--data-dir", str(mosaics), "--output", str(fig), "--num", "3", "--zoom", "2"])
    w, h = Image.open(fig).size
    assert w == 90 + 3 * 36 * 2 and h > 3 * 32 * 2 + 2 * 22 and (h - 3 * 32 * 2 - 4) % 22 == 0
    # resuming with another head width is refused in one line
    assert main(_train_cmd(mosaics, b, "--iters", "8", "--channels", "24",
                           "--resume", str(b / "last.pth"))) == 2
    assert "cannot resume" in capsys.readouterr().err


@needs_fmnist
def test_compile_blocks_trains_the_same_weights(mosaics, tmp_path, monkeypatch):
    """`seg train --compile blocks`: every TransNeXt block goes through Dynamo (traced here
    with the eager backend: Inductor's C++ compile would cost CI minutes) and training ends
    on the eager run's weights."""
    from torch._dynamo.utils import counters

    import transnext.models.transnext as T
    # eager training runs the attention's q/kv/sr as one product, graphs as three: rounding
    # AdamW turns into different weights where a gradient is ~0; compare like with like
    monkeypatch.setattr(T, "_joint_linears", lambda x, layers: None)
    base = ["--iters", "3", "--eval-interval", "1000"]
    assert main(_train_cmd(mosaics, tmp_path / "eager", *base)) == 0
    torch._dynamo.reset()
    counters.clear()
    assert main(_train_cmd(mosaics, tmp_path / "blocks", *base, "--compile", "blocks",
                           "--compile-backend", "eager")) == 0
    assert counters["frames"]["ok"] >= 4  # a graph per stage at least (femto: 4 stages)
    torch._dynamo.reset()
    ref = torch.load(tmp_path / "eager" / "last.pth", weights_only=True)["model"]
    got = torch.load(tmp_path / "blocks" / "last.pth", weights_only=True)["model"]
    assert ref.keys() == got.keys()  # compiled in place: the parameter names are kept
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


@needs_fmnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_like_eager(mosaics, tmp_path, caplog, capsys, monkeypatch):
    """`seg train --cuda-graphs`: the backbone's step replays CUDA graphs from the second
    iteration on (the first records them) and the losses follow the eager run's. The two
    validations (7 images in batches of 4: two shapes) replay inference graphs, and the
    last one's mIoU is an eager `seg eval`'s of the checkpoint, as is `seg eval
    --cuda-graphs`'s."""
    def run(out, *extra):
        cmd = [a for a in _train_cmd(mosaics, out, "--iters", "4", "--ckpt-interval", "2",
                                     "--eval-interval", "2",
                                     "--device", "cuda", "--amp", "bf16", "--drop-path", "0",
                                     *extra)
               if a != "--deterministic"]  # cuBLAS's deterministic mode needs an env setting
        assert main(cmd) == 0
        return [r["train_loss"] for r in json.loads((out / "metrics.json").read_text())
                if "train_loss" in r]

    graphs_follow_eager(run, tmp_path, caplog, replays=4, evals=4)
    val = json.loads((tmp_path / "graphs" / "metrics.json").read_text())[-1]["val_mIoU"]
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "triton")  # the kernels a recording runs
    monkeypatch.setenv("TRANSNEXT_GLU", "triton")
    capsys.readouterr()
    got = {}
    for mode, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        js = tmp_path / f"{mode}.json"
        assert main(["seg", "eval", "--checkpoint", str(tmp_path / "graphs" / "last.pth"),
                     "--data-dir", str(mosaics), "--batch-size", "4", "--workers", "0",
                     "--device", "cuda", "--amp", "bf16", "--json", str(js), *extra]) == 0
        got[mode] = json.loads(js.read_text())["mIoU"]
    assert ("CUDA graphs: 2 call(s) replayed, 0 run eagerly (other input shapes); "
            "2 graph(s) recorded") in capsys.readouterr().out
    # percent: a pixel that flips between bf16 runs moves a small class's IoU a little
    assert val == pytest.approx(got["eager"], abs=0.5)
    assert got["graphs"] == pytest.approx(got["eager"], abs=0.5)


@needs_fmnist
@pytest.mark.slow
def test_two_process_gloo_train_and_eval(mosaics, tmp_path):
    out = tmp_path / "ddp"
    run_ok(torchrun(*_train_cmd(mosaics, out, "--iters", "2", "--batch-size", "2")))
    assert torch.load(out / "last.pth", weights_only=True)["iter"] == 2
    ev = ["seg", "eval", "--checkpoint", str(out / "last.pth"), "--data-dir", str(mosaics),
          "--workers", "0"]
    one_cmd = [PY, "-m", "transnext", *ev, "--json", str(tmp_path / "one.json")]
    two_cmd = torchrun(*ev, "--json", str(tmp_path / "two.json"))  # 7 images: 4 + 3
    with ThreadPoolExecutor(2) as pool:  # the one-process eval beside the pair
        list(pool.map(run_ok, (one_cmd, two_cmd)))
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["pixels"] == two["pixels"] == 7 * 32 * 32
    assert two["mIoU"] == pytest.approx(one["mIoU"]) and two["aAcc"] == pytest.approx(one["aAcc"])


@needs_fmnist
def test_pretrained_from_a_classification_training_checkpoint(mosaics, tmp_path, capsys):
    """`transnext train` keeps its weights under "model" (beside optimizer state and
    args): `seg train --pretrained` starts the backbone from them, and refuses a variant
    that does not fit in one line."""
    import transnext
    torch.manual_seed(1)
    cls = transnext.create_model("transnext_femto", num_classes=10, in_chans=3)
    ckpt = tmp_path / "cls.pth"
    torch.save({"model": cls.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 3, "model_name": "transnext_femto",
                "args": {"model": "transnext_femto"}}, ckpt)
    out = tmp_path / "seg"
    # lr 1e-12: one AdamW step moves a weight by about 1e-12
    assert main(_train_cmd(mosaics, out, "--iters", "1", "--lr", "1e-12", "--pretrained",
                           str(ckpt))) == 0
    got = torch.load(out / "last.pth", weights_only=True)["model"]
    own = {k: v for k, v in cls.state_dict().items() if not k.startswith("head.")}
    loaded = [k for k in own if f"backbone.model.{k}" in got]
    assert len(loaded) > 0.9 * len(own)
    for k in loaded:
        assert torch.allclose(got[f"backbone.model.{k}"], own[k], rtol=0, atol=1e-9), k
    capsys.readouterr()
    assert main(_train_cmd(mosaics, tmp_path / "o2", "--iters", "1", "--model",
                           "transnext_micro", "--pretrained", str(ckpt))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transnext_femto" in err[0]


def test_palette_keeps_small_class_sets_apart():
    from transnext.tasks.segmentation.names import palette
    for n in (2, 11, 21, 40):
        pal = palette(n)
        assert pal.shape == (n, 3) and tuple(pal[0]) == (0, 0, 0)
        assert len({tuple(c) for c in pal}) == n
    assert len(palette(150)) == 150  # ADE20K's own
