"""`transnext det train|eval|predict --arch dino-4scale` on real Fashion-MNIST instance
mosaics: training with DETR's multi-scale augmentation and denoising queries, box AP
evaluation, exact resume, predictions without masks, a released DINO file as
--pretrained, and the flags of the other architecture refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fmnist, run_ok, torchrun
from seg_helpers import random_state, read_layout
from transnext.cli import main


def _dino_cmd(data, out, *extra):
    return ["det", "train", "--recipe", "dino-fmnist", "--data-dir", str(data),
            "--output", str(out), "--min-size", "64", "--max-size", "80", "--pretrain-size",
            "64", "--batch-size", "2", "--epochs", "2", "--workers", "0", "--threads", "1",
            "--no-progress", "--no-tensorboard", "--eval-batch-size", "5", "--seed", "3",
            "--deterministic", "--time-budget", "0", "--warmup-iters", "2", "--num-queries",
            "20", "--dn-queries", "6", *extra]


@needs_fmnist
def test_dino_train_eval_predict_and_exact_resume(mosaics, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--ckpt-interval", "3", "--eval-interval", "1")
    assert main(_dino_cmd(mosaics, a, *common)) == 0
    out = capsys.readouterr().out
    assert out.count("box AP") == 2 and "mask AP" not in out
    ref = torch.load(a / "last.pth", weights_only=True)
    assert ref["iter"] == 8 and ref["det_config"]["arch"] == "dino-4scale"
    assert ref["det_config"]["num_queries"] == 20 and ref["det_config"]["num_dn_queries"] == 6
    assert "dn_query_generator.label_embedding.weight" in ref["model"]
    rows = json.loads((a / "metrics.json").read_text())
    logged = [r for r in rows if "train_loss_cls" in r]
    assert logged and all(np.isfinite(r["train_loss"]) and r["train_loss"] > r["train_loss_cls"]
                          for r in logged)
    ap = ref["metrics"]["val_bbox_AP"]
    assert 0 <= ap <= 100 and "val_segm_AP" not in ref["metrics"]

    # exact resume from a mid-epoch checkpoint: the denoising noise and the augmentation
    # come back with the RNG state and the (seed, epoch, index) draws
    assert main(_dino_cmd(mosaics, b, *common, "--stop-after-iters", "3")) == 0
    assert main(_dino_cmd(mosaics, b, *common, "--resume", str(b / "last.pth"))) == 0
    got = torch.load(b / "last.pth", weights_only=True)
    assert got["iter"] == 8
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    capsys.readouterr()

    # eval: the number training logged, box results only
    assert main(["det", "eval", "--checkpoint", str(a / "last.pth"), "--data-dir", str(mosaics),
                 "--batch-size", "5", "--workers", "0", "--json", str(tmp_path / "e.json"),
                 "--results", str(tmp_path / "res" / "val")]) == 0
    printed = capsys.readouterr().out
    assert "bbox" in printed and "segm" not in printed
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["bbox"]["AP"] == pytest.approx(ap) and "segm" not in ev
    assert (tmp_path / "res" / "val.bbox.json").is_file()

    # predict: boxes drawn, COCO box results (no segmentation)
    img = mosaics / "val2017" / "00001.png"
    assert main(["det", "predict", str(img), "--checkpoint", str(a / "last.pth"),
                 "--output", str(tmp_path / "pred"), "--score-thr", "0"]) == 0
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert pred and all("segmentation" not in p and len(p["bbox"]) == 4 for p in pred)
    assert len(pred) <= 100 and {p["category_id"] for p in pred} <= set(range(1, 11))
    drawn = np.array(Image.open(tmp_path / "pred" / "00001.png"))
    assert drawn.shape == (64, 64, 3)
    assert not np.array_equal(drawn, np.array(Image.open(img).convert("RGB")))


@needs_fmnist
def test_dino_flags_and_pretrained_files_are_checked(mosaics, tmp_path, capsys):
    assert main(_dino_cmd(mosaics, tmp_path / "o1", "--fpn-channels", "16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fpn-channels" in err[0] and "dino-4scale" in err[0]
    assert main(_dino_cmd(mosaics, tmp_path / "o0", "--compile")) == 2
    assert "--compile is not available for --arch dino" in capsys.readouterr().err
    assert main(["det", "train", "--recipe", "maskrcnn-fmnist", "--data-dir", str(mosaics),
                 "--output", str(tmp_path / "o2"), "--num-queries", "10"]) == 2
    assert "--num-queries: not an option of --arch mask-rcnn" in capsys.readouterr().err
    # a released Mask R-CNN file is not a DINO start
    mrcnn = tmp_path / "mask_rcnn.pth"
    torch.save({"state_dict": random_state(read_layout("maskrcnn_transnext_tiny.keys.txt"),
                                           seed=1)}, mrcnn)
    assert main(_dino_cmd(mosaics, tmp_path / "o3", "--pretrained", str(mrcnn))) == 2
    err = capsys.readouterr().err
    assert "released Mask R-CNN" in err and "dino-4scale" in err


@pytest.mark.slow
@needs_fmnist
def test_dino_two_process_gloo_train(mosaics, tmp_path):
    out = tmp_path / "ddp"
    run_ok(torchrun(*_dino_cmd(mosaics, out, "--epochs", "1", "--batch-size", "1")))
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["iter"] == 4 and len(ck["rng"]) == 2
    assert 0 <= ck["metrics"]["val_bbox_AP"] <= 100
