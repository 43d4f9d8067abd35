"""The `transnext det` jobs on real Fashion-MNIST instance mosaics (PNG files + COCO
json): training, eval, predict, exact resume, a two-process gloo torchrun run, the
converter on a file with every released key, and bad input reaching the user as one
line."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (PY, REPO, graphs_follow_eager, needs_fmnist, run_ok, subprocess_env,
                      torchrun)
from seg_helpers import random_state, read_layout
from transnext.cli import main


def _train_cmd(data, out, *extra):
    return ["det", "train", "--recipe", "maskrcnn-fmnist", "--data-dir", str(data),
            "--output", str(out), "--min-size", "64", "--max-size", "64", "--pretrain-size",
            "64", "--batch-size", "2", "--epochs", "2", "--workers", "0", "--threads", "1",
            "--no-progress", "--no-tensorboard", "--eval-batch-size", "5", "--seed", "3",
            "--deterministic", "--time-budget", "0", "--warmup-iters", "2", *extra]


def _coco_gt(image_ids, size):
    from pycocotools.coco import COCO
    from transnext.tasks.detection.mosaics import categories
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "height": size, "width": size} for i in image_ids],
                  "categories": categories(), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _load_res(gt, entries):
    with contextlib.redirect_stdout(io.StringIO()):
        return gt.loadRes(entries)


@needs_fmnist
def test_train_eval_predict_and_exact_resume(mosaics, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    # 8 images, batch 2: 4 iterations per epoch; checkpoints every 3 iterations and at
    # each epoch's end, evaluation after each epoch
    common = ("--ckpt-interval", "3", "--eval-interval", "1")
    assert main(_train_cmd(mosaics, a, *common, "--json", str(tmp_path / "a.json"))) == 0
    out = capsys.readouterr().out
    assert out.count("box AP") == 2 and "mask AP" in out
    ref = torch.load(a / "last.pth", weights_only=True)
    assert ref["iter"] == 8 and ref["iters_per_epoch"] == 4
    assert ref["class_names"][0] == "T-shirt/top" and ref["cat_ids"] == list(range(1, 11))
    assert (a / "best.pth").is_file() and (a / "metrics.csv").is_file()
    rows = json.loads((a / "metrics.json").read_text())
    assert [r["iter"] for r in rows if "val_bbox_AP" in r] == [4, 8]
    ap = ref["metrics"]["val_bbox_AP"], ref["metrics"]["val_segm_AP"]
    assert all(0 <= v <= 100 for v in ap)
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["iter"] == 8 and summary["best_box_AP"] >= ap[0]

    # exact resume: stop after 3 iterations (mid-epoch checkpoint), continue to the end
    assert main(_train_cmd(mosaics, b, *common, "--stop-after-iters", "3")) == 0
    assert torch.load(b / "last.pth", weights_only=True)["iter"] == 3
    assert main(_train_cmd(mosaics, b, *common, "--resume", str(b / "last.pth"))) == 0
    got = torch.load(b / "last.pth", weights_only=True)
    assert got["iter"] == 8
    assert set(got["model"]) == set(ref["model"])
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    for s, t in zip(got["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
    assert got["metrics"]["val_bbox_AP"] == ref["metrics"]["val_bbox_AP"]
    capsys.readouterr()
    # resuming into another head width is refused, naming both
    assert main(_train_cmd(mosaics, b, "--fpn-channels", "16", "--epochs", "3",
                           "--resume", str(b / "last.pth"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "fpn_channels" in err[0]

    # eval of the checkpoint: the numbers training logged, COCO result files
    assert main(["det", "eval", "--checkpoint", str(a / "last.pth"), "--data-dir", str(mosaics),
                 "--batch-size", "5", "--workers", "0", "--json", str(tmp_path / "e.json"),
                 "--results", str(tmp_path / "res" / "val")]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "bbox" in printed and "segm" in printed
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["images"] == 5
    assert ev["bbox"]["AP"] == pytest.approx(ap[0]) and ev["segm"]["AP"] == pytest.approx(ap[1])
    for t in ("bbox", "segm"):
        assert 0 <= ev[t]["AP50"] <= 100 and 0 <= ev[t]["AR@100"] <= 100
    from transnext.tasks.detection.coco import CocoDetection, resolve_coco
    val = CocoDetection(*resolve_coco(mosaics, "val"))
    entries = json.loads((tmp_path / "res" / "val.segm.json").read_text())
    assert entries and {e["image_id"] for e in entries} <= set(val.image_ids)
    _load_res(val.coco, entries)

    # predict: PNGs with the detections drawn, COCO results keyed by the file stem
    imgs = [mosaics / "val2017" / "00000.png", mosaics / "val2017" / "00003.png"]
    assert main(["det", "predict", *map(str, imgs), "--checkpoint", str(a / "last.pth"),
                 "--output", str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    assert "00003.png" in capsys.readouterr().out
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert pred and {p["image_id"] for p in pred} <= {0, 3}
    for f in imgs:  # drawn on where something was detected, untouched elsewhere
        drawn = np.array(Image.open(tmp_path / "pred" / f.name))
        assert drawn.shape == (64, 64, 3)
        found = any(p["image_id"] == int(f.stem) for p in pred)
        assert found != np.array_equal(drawn, np.array(Image.open(f).convert("RGB")))
    assert {p["category_id"] for p in pred} <= set(range(1, 11))
    assert all(p["score"] >= 0.05 and "counts" in p["segmentation"] for p in pred)
    res = _load_res(_coco_gt([0, 3], 64), pred)
    assert len(res.getAnnIds()) == len(pred)


def _cuda_cmd(mosaics, out, *extra):
    """A short bf16 `det train` on the GPU, logging every step."""
    return [a for a in _train_cmd(mosaics, out, "--device", "cuda", "--amp", "bf16",
                                  "--drop-path", "0", "--log-interval", "1", *extra)
            if a != "--deterministic"]  # cuBLAS's deterministic mode needs an env setting


def _train_losses(out):
    return [r["train_loss"] for r in json.loads((out / "metrics.json").read_text())
            if "train_loss" in r]


def _cuda_run(mosaics, out, *extra):
    """`_cuda_cmd` in this process; its logged training losses."""
    assert main(_cuda_cmd(mosaics, out, *extra)) == 0
    return _train_losses(out)


@needs_fmnist
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_inference_refuses_cuda_graphs_on_the_cpu_before_loading(command, mosaics, tmp_path,
                                                                 capsys):
    ck = tmp_path / "not_read.pth"
    ck.write_bytes(b"")  # read only after the check
    extra = (["--data-dir", str(mosaics)] if command == "eval"
             else [str(mosaics / "val2017" / "00000.png"), "--output", str(tmp_path)])
    rc = main(["det", command, "--checkpoint", str(ck), *extra, "--device", "cpu",
               "--cuda-graphs"])
    assert rc == 2
    assert "--cuda-graphs needs a CUDA device (this run uses cpu)" in capsys.readouterr().err


def _graphed_inference_follows_eager(ck, mosaics, tmp_path, capsys, monkeypatch):
    """`det eval` and `det predict` with --cuda-graphs against eager, both running the
    kernels a recording runs (LayerNorm, GLU): the same metrics and detections. Eval in
    batches of 2 over 5 images: two padded shapes (2 and 1 images), two graphs in one pool."""
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "triton")
    monkeypatch.setenv("TRANSNEXT_GLU", "triton")
    run = {}
    for mode, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        out = tmp_path / f"eval_{mode}"
        assert main(["det", "eval", "--checkpoint", str(ck), "--data-dir", str(mosaics),
                     "--batch-size", "2", "--workers", "0", "--device", "cuda", "--amp", "bf16",
                     "--json", str(out.with_suffix(".json")), "--results", str(out),
                     *extra]) == 0
        printed = capsys.readouterr().out
        imgs = [str(mosaics / "val2017" / f"0000{i}.png") for i in (0, 3)]
        assert main(["det", "predict", *imgs, "--checkpoint", str(ck), "--device", "cuda",
                     "--amp", "bf16", "--output", str(tmp_path / f"pred_{mode}"),
                     "--score-thr", "0", *extra]) == 0
        printed += capsys.readouterr().out
        run[mode] = (json.loads(out.with_suffix(".json").read_text()),
                     json.loads(Path(f"{out}.bbox.json").read_text()),
                     json.loads((tmp_path / f"pred_{mode}" / "predictions.json").read_text()),
                     printed)
    (m0, d0, p0, _), (m1, d1, p1, printed) = run["eager"], run["graphs"]
    assert ("CUDA graphs: 3 call(s) replayed, 0 run eagerly (other input shapes); "
            "2 graph(s) recorded") in printed
    assert ("CUDA graphs: 2 call(s) replayed, 0 run eagerly (other input shapes); "
            "1 graph(s) recorded") in printed
    for t in {"bbox", "segm"} & m0.keys():  # DINO: boxes only
        for k in ("AP", "AP50", "AR@100"):
            assert m1[t][k] == pytest.approx(m0[t][k], abs=0.5), (t, k)
    for a, b in ((d0, d1), (p0, p1)):
        assert a and abs(len(a) - len(b)) <= max(1, len(a) // 50)
        for i in {e["image_id"] for e in a}:  # each image's best scores
            sa = sorted((e["score"] for e in a if e["image_id"] == i), reverse=True)[:10]
            sb = sorted((e["score"] for e in b if e["image_id"] == i), reverse=True)[:10]
            assert sb == pytest.approx(sa, abs=1e-2), i
    return m0


@needs_fmnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_mask_rcnn_trains_like_eager(mosaics, tmp_path, caplog, capsys,
                                                monkeypatch):
    """`det train --cuda-graphs`: every step's backbone replays a graph (the 64 px mosaics
    fit one canvas, the size their batches have anyway) and the losses follow eager's: the
    first two steps (the second after the graphed backward's update) to 1%, the run's mean to
    5%. Later steps are compared only through the mean: the RPN's and RoI heads' discrete
    choices (top-k, NMS, sampling) turn bf16 rounding differences into other proposals, and
    two eager runs already differ by up to 6% at a step (H100). The validation at the end
    (one batch of 5) replays an inference graph, and its metrics are those of an eager `det
    eval` of the checkpoint. Then eval and predict of the checkpoint with
    inference graphs against eager."""
    ref, got = graphs_follow_eager(lambda out, *extra: _cuda_run(mosaics, out, *extra),
                                   tmp_path, caplog, replays=8, steps=2,  # 2 epochs x 4 batches
                                   evals=1)
    assert np.mean(got) == pytest.approx(np.mean(ref), rel=5e-2)
    val = json.loads((tmp_path / "graphs" / "metrics.json").read_text())[-1]
    eager = _graphed_inference_follows_eager(tmp_path / "graphs" / "last.pth", mosaics,
                                             tmp_path, capsys, monkeypatch)
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50"):
            assert val[f"val_{t}_{k}"] == pytest.approx(eager[t][k], abs=0.5), (t, k)


@needs_fmnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_dino_replays_every_step(mosaics, tmp_path, caplog, capsys, monkeypatch):
    """DINO's multi-scale crops give batches of several sizes; with --max-size 64 every one
    fits the single 64 x 64 canvas, so all 8 steps replay the one graph. (Against eager the
    padding differs, so the losses are only checked to be finite.) Then eval and predict
    with inference graphs against eager."""
    import logging
    with caplog.at_level(logging.INFO, logger="transnext"):
        losses = _cuda_run(mosaics, tmp_path / "g", "--recipe", "dino-fmnist", "--max-size",
                           "64", "--num-queries", "40", "--dn-queries", "10", "--detections",
                           "40", "--cuda-graphs")  # 85 encoder tokens at 64 x 64
    assert "training batches padded to 64x64" in caplog.text
    # the one validation (at the end: 5 images, one batch) replays an inference graph
    assert ("CUDA graphs: 8 call(s) replayed, 0 run eagerly in training; 1 replayed, 0 "
            "eagerly in evaluation") in caplog.text
    assert len(losses) == 8 and all(np.isfinite(losses))
    _graphed_inference_follows_eager(tmp_path / "g" / "last.pth", mosaics, tmp_path, capsys,
                                     monkeypatch)


@needs_fmnist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_graphs_det_train_under_torchrun(mosaics, tmp_path):
    """`det train --cuda-graphs` in two NCCL processes: no DDP, the gradients averaged by
    `GradientAverager(uneven=True)`. Mask R-CNN replays every step and follows the eager
    two-process job (first step to 1%, mean to 5%, as in one process); DINO's multi-scale
    batches all replay the one 64 x 64 canvas and its losses stay finite."""
    def run(out, *extra):
        p = run_ok(torchrun(*_cuda_cmd(mosaics, out, *extra)))
        return _train_losses(out), p.stdout + p.stderr

    ref, _ = run(tmp_path / "eager")
    got, log = run(tmp_path / "graphs", "--cuda-graphs")
    # 8 images over 2 ranks, batches of 2: 2 steps an epoch on each rank, 2 epochs
    assert "CUDA graphs: 4 call(s) replayed, 0 run eagerly" in log
    assert len(got) == len(ref) and got[:1] == pytest.approx(ref[:1], rel=1e-2)
    assert np.mean(got) == pytest.approx(np.mean(ref), rel=5e-2)
    dino, log = run(tmp_path / "dino", "--recipe", "dino-fmnist", "--num-queries", "40",
                    "--dn-queries", "10", "--detections", "40", "--cuda-graphs")
    assert "CUDA graphs: 4 call(s) replayed, 0 run eagerly" in log
    assert len(dino) == 4 and all(np.isfinite(dino))


@needs_fmnist
@pytest.mark.slow
def test_two_process_gloo_train_and_eval(mosaics, tmp_path):
    out = tmp_path / "ddp"
    run_ok(torchrun(*_train_cmd(mosaics, out, "--epochs", "1", "--batch-size", "1",
                               "--threads", "1")))
    ck = torch.load(out / "last.pth", weights_only=True)
    # 8 images over 2 processes, 1 per batch: 4 iterations per epoch
    assert ck["iter"] == 4 and ck["iters_per_epoch"] == 4 and len(ck["rng"]) == 2
    assert 0 <= ck["metrics"]["val_bbox_AP"] <= 100
    ev = ["det", "eval", "--checkpoint", str(out / "last.pth"), "--data-dir", str(mosaics),
          "--workers", "0", "--threads", "1"]
    one_cmd = [PY, "-m", "transnext", *ev, "--json", str(tmp_path / "one.json")]
    two_cmd = torchrun(*ev, "--json", str(tmp_path / "two.json"))  # 5 images: 3 + 2
    with ThreadPoolExecutor(2) as pool:  # the one-process eval beside the pair
        list(pool.map(run_ok, (one_cmd, two_cmd)))
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["images"] == two["images"] == 5 and two["processes"] == 2
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AR@100"):
            assert two[t][k] == pytest.approx(one[t][k], nan_ok=True), (t, k)


def test_convert_a_file_with_every_released_key(tmp_path, capsys):
    from transnext.tasks.detection.convert import load_converted
    sd = random_state(read_layout("maskrcnn_transnext_tiny.keys.txt"), seed=5)
    names = [f"thing{i}" for i in range(80)]
    src = tmp_path / "mask_rcnn_transnext_tiny_fpn_1x_coco_in1k.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": names}}, src)
    dst = tmp_path / "out" / "maskrcnn-tiny.safetensors"
    assert main(["det", "convert", str(src), str(dst)]) == 0
    assert "transnext_tiny, 80 classes" in capsys.readouterr().out
    cfg = json.loads(dst.with_suffix(".json").read_text())
    assert cfg["model"] == "transnext_tiny" and cfg["class_names"] == names
    net = load_converted(dst)
    own = net.state_dict()
    assert torch.equal(own["backbone.body.block3.14.mlp.fc2.weight"],
                       sd["backbone.block3.14.mlp.fc2.weight"])
    w = sd["roi_head.bbox_head.fc_cls.weight"]
    assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"],
                       torch.cat([w[80:], w[:80]]))
    # a file of another head: one line, exit 2
    up = random_state(read_layout("upernet_transnext_tiny.keys.txt"), seed=6)
    torch.save({"state_dict": up}, tmp_path / "upernet.pth")
    assert main(["det", "convert", str(tmp_path / "upernet.pth"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UperNet checkpoint, not Mask R-CNN" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def _cli(*args):
    p = subprocess.run([PY, "-m", "transnext", *args], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and lines[-1].startswith("transnext det: error:"), p.stderr
    return lines[-1]


def _copy_set(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@needs_fmnist
def test_bad_input_is_one_line(mosaics, tmp_path, capsys):
    from concurrent.futures import ThreadPoolExecutor

    import transnext
    from transnext.tasks.detection.evaluate import CONFIG_KEY
    from transnext.tasks.detection.maskrcnn import build_maskrcnn

    # the inputs of the console-script cases first: those run in the background, two at a
    # time (each start imports torch), while the cases through main() run here
    # a missing annotation file
    noann = _copy_set(mosaics, tmp_path / "noann")
    (noann / "annotations" / "instances_train2017.json").unlink()
    # a corrupt image: named up front by the check, and at load time with --no-verify
    corrupt = _copy_set(mosaics, tmp_path / "corrupt")
    (corrupt / "val2017" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    # checkpoints of another task, variant or class count
    cls = tmp_path / "femto_cls.pth"
    torch.save({"model": transnext.create_model("transnext_femto", num_classes=10).state_dict(),
                "model_name": "transnext_femto"}, cls)
    cfg = dict(arch="mask-rcnn", model="transnext_femto", num_classes=3, pos_bias="extrapolate",
               pretrain_size=64, min_size=64, max_size=64, fpn_channels=16, box_fc=32,
               mask_channels=16)
    net = build_maskrcnn(**{k: v for k, v in cfg.items() if k != "arch"})
    torch.save({"model": net.state_dict(), CONFIG_KEY: cfg}, tmp_path / "three.pth")
    cases = {
        "noann": _train_cmd(noann, tmp_path / "o1"),
        "corrupt": _train_cmd(corrupt, tmp_path / "o2"),
        "classification": ["det", "eval", "--checkpoint", str(cls), "--data-dir", str(mosaics)],
        "variant": ["det", "eval", "--checkpoint", str(tmp_path / "three.pth"), "--data-dir",
                    str(mosaics), "--model", "transnext_micro"],
    }
    with ThreadPoolExecutor(2) as pool:
        lines = {name: pool.submit(_cli, *args) for name, args in cases.items()}

        # an annotation that is not COCO's: the json and the annotation id
        d = _copy_set(mosaics, tmp_path / "badann")
        ann = d / "annotations" / "instances_val2017.json"
        data = json.loads(ann.read_text())
        data["annotations"][1]["bbox"] = [1, 2, 3]
        ann.write_text(json.dumps(data))
        assert main(_train_cmd(d, tmp_path / "o3")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "instances_val2017.json" in err[0]
        assert f"annotation {data['annotations'][1]['id']} has bbox" in err[0]
        # no training image left after filtering
        d = _copy_set(mosaics, tmp_path / "empty")
        ann = d / "annotations" / "instances_train2017.json"
        data = json.loads(ann.read_text())
        for a in data["annotations"]:
            a["bbox"][2] = 0.5
        ann.write_text(json.dumps(data))
        assert main(_train_cmd(d, tmp_path / "o4")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no training image left" in err[0] and "8 image(s)" in err[0]
        # a detector of another class count
        assert main(["det", "eval", "--checkpoint", str(tmp_path / "three.pth"), "--data-dir",
                     str(mosaics)]) == 2
        err = capsys.readouterr().err
        assert "predicts 3 classes" in err and "10 categories" in err
        assert main(_train_cmd(mosaics, tmp_path / "o5", "--pretrained",
                               str(tmp_path / "three.pth"))) == 2
        err = capsys.readouterr().err
        assert "mask-rcnn on transnext_femto with 3 classes" in err and "with 10 classes" in err
        assert main(_train_cmd(mosaics, tmp_path / "o6", "--model", "transnext_micro",
                               "--pretrained", str(cls))) == 2
        assert "transnext_femto" in capsys.readouterr().err

        lines = {name: f.result() for name, f in lines.items()}
    assert "annotation file not found" in lines["noann"]
    assert "instances_train2017.json" in lines["noann"]
    assert "00002.png (id 3): unreadable" in lines["corrupt"]
    assert "classification checkpoint of transnext_femto" in lines["classification"]
    assert "not a detector" in lines["classification"]
    assert "transnext_femto, not transnext_micro" in lines["variant"]


def test_bf16_autocast_keeps_boxes_in_float32():
    """Under AMP the box arithmetic stays float32 (mmdet's force_fp32): proposals and
    detections in bf16 would be rounded to whole pixels and worse."""
    from transnext.tasks.detection.maskrcnn import build_maskrcnn
    torch.manual_seed(0)
    net = build_maskrcnn("transnext_femto", 3, pos_bias="extrapolate", pretrain_size=64,
                         min_size=96, max_size=96, fpn_channels=16, box_fc=32, mask_channels=16,
                         anchor_scale=4.0)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:44] = 1
    targets = [dict(boxes=torch.tensor([[12.0, 10.0, 44.0, 40.0]]), labels=torch.tensor([2]),
                    masks=masks)] * 2
    seen = []
    hook = net.roi_heads.box_roi_pool.register_forward_hook(
        lambda m, args, out: seen.append(args[1][0].dtype))
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = net(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images)
    hook.remove()
    assert seen and all(d == torch.float32 for d in seen)  # proposals reach RoIAlign in fp32
    for o in out:
        assert o["boxes"].dtype == o["scores"].dtype == o["masks"].dtype == torch.float32
