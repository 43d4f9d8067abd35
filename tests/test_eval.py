"""Evaluation: the robustness suite on tiny folders laid out like the real sets, checked
against hand-computed values; checkpoint and image faults in eval/predict."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_image_folder
from transnext.cli import main
from transnext.engine.robustness import corruption_errors, subset_indices
from transnext.data import imagenet_a_wnids, imagenet_wnids

W = imagenet_wnids()
TENCH, GOLDFISH, A6, A11 = W[0], W[1], W[6], W[11]  # W[6], W[11] are ImageNet-A classes


@pytest.fixture(scope="module")
def constant_ckpt(tmp_path_factory, model_name):
    """A real 1000-class model whose logits do not depend on the image: head weight 0,
    bias 10 on class 0 (tench, not in ImageNet-A/-R), 5 on class 6 (in both subsets).
    Unrestricted it always predicts 0; restricted to A's or R's 200 classes, 6."""
    import transnext
    m = transnext.create_model(model_name, num_classes=1000, in_chans=3)
    sd = m.state_dict()
    sd["head.weight"].zero_()
    sd["head.bias"].zero_()
    sd["head.bias"][0] = 10.0
    sd["head.bias"][6] = 5.0
    path = tmp_path_factory.mktemp("ck") / "constant.pth"
    torch.save(sd, path)
    return path


def test_subset_indices_are_the_published_mapping():
    a = subset_indices(imagenet_a_wnids())
    assert len(a) == 200 and a[:5] == [6, 11, 13, 15, 17]  # timm/hendrycks' A mask
    assert 0 not in a and 6 in a


def test_mce_arithmetic_by_hand():
    # gaussian_noise at severities 1 and 3: errors 0.0 and 1.0;
    # AlexNet's: 0.69528 + 0.93554 = 1.63082 -> CE = 100 * 1.0 / 1.63082
    # brightness at severity 5: error 0.5; AlexNet's 0.72440 -> CE = 100 * 0.5 / 0.7244
    r = corruption_errors({"gaussian_noise": {1: 0.0, 3: 1.0}, "brightness": {5: 0.5}})
    assert r["ce"]["gaussian_noise"] == pytest.approx(61.31884573)
    assert r["ce"]["brightness"] == pytest.approx(69.02263942)
    assert r["mce"] == pytest.approx((61.31884573 + 69.02263942) / 2)
    assert r["corruptions"] == 2 and not r["complete"]
    # every corruption at AlexNet's own errors -> every CE and the mCE are exactly 100
    from transnext.data import imagenet_c_alexnet_errors
    alex = imagenet_c_alexnet_errors()
    full = corruption_errors({c: {s + 1: e for s, e in enumerate(v)} for c, v in alex.items()})
    assert full["complete"] and full["mce"] == pytest.approx(100.0)
    assert sum(alex["gaussian_noise"]) / 5 == pytest.approx(0.886428)  # published mean


def test_robustness_suite_on_tiny_folders(constant_ckpt, tmp_path, model_name, capsys):
    # ImageNet-A: 2 images of class 6 (right once restricted), 2 of class 11 (wrong): 50%
    a = make_image_folder(tmp_path / "a", [A6, A11], 2)
    # ImageNet-R: 1 of class 6, 3 of class 11: 25%
    r = tmp_path / "r"
    make_image_folder(r, [A6], 1)
    make_image_folder(r, [A11], 3, seed=3)
    # Sketch: 1 tench (right), 1 goldfish (wrong): 50%
    sk = make_image_folder(tmp_path / "sketch", [TENCH, GOLDFISH], 1)
    # V2: folders named by class index: "0" (right) x3, "11" (wrong) x1: 75%
    v2 = make_image_folder(tmp_path / "v2", ["0"], 3)
    make_image_folder(v2, ["11"], 1, seed=4)
    # C: gaussian_noise/1 all tench (error 0), gaussian_noise/3 all goldfish (error 1),
    #    brightness/5 half and half (error 0.5)
    c = tmp_path / "c"
    make_image_folder(c / "gaussian_noise" / "1", [TENCH], 2)
    make_image_folder(c / "gaussian_noise" / "3", [GOLDFISH], 2)
    make_image_folder(c / "brightness" / "5", [TENCH, GOLDFISH], 1)
    js = tmp_path / "rob.json"
    assert main(["eval", "--model", model_name, "--checkpoint", str(constant_ckpt),
                 "--suite", "robustness", "--input-size", "32", "--workers", "0",
                 "--imagenet-a", str(a), "--imagenet-r", str(r), "--imagenet-sketch", str(sk),
                 "--imagenet-v2", str(v2), "--imagenet-c", str(c), "--json", str(js)]) == 0
    res = json.loads(js.read_text())["robustness"]
    assert res["imagenet-a"]["top1"] == pytest.approx(50.0)
    assert res["imagenet-a"]["count"] == 4
    assert res["imagenet-r"]["top1"] == pytest.approx(25.0)
    assert res["imagenet-sketch"]["top1"] == pytest.approx(50.0)
    assert res["imagenet-v2"]["top1"] == pytest.approx(75.0)
    rc = res["imagenet-c"]
    assert rc["error"]["gaussian_noise"] == {"1": pytest.approx(0.0), "3": pytest.approx(100.0)}
    assert rc["ce"]["gaussian_noise"] == pytest.approx(61.31884573)
    assert rc["ce"]["brightness"] == pytest.approx(69.02263942)
    assert rc["mce"] == pytest.approx(65.17074258)
    out = capsys.readouterr().out
    assert "| imagenet-a | 50.00 |" in out and "mCE" in out


def test_robustness_rejects_folder_outside_subset(constant_ckpt, tmp_path, model_name, capsys):
    a = make_image_folder(tmp_path / "a", [TENCH], 1)  # tench is not an ImageNet-A class
    assert main(["eval", "--model", model_name, "--checkpoint", str(constant_ckpt),
                 "--suite", "robustness", "--input-size", "32", "--workers", "0",
                 "--imagenet-a", str(a)]) == 2
    assert "not in this set's 200 classes" in capsys.readouterr().err


def test_checkpoint_of_another_model(constant_ckpt, tiny_folder, tmp_path, capsys):
    assert main(["eval", "--model", "transnext_micro", "--checkpoint", str(constant_ckpt),
                 "--data-dir", str(tiny_folder), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(constant_ckpt) in err and "Traceback" not in err
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    assert main(["predict", str(bad), "--model", "transnext_femto", "--checkpoint", str(bad)]) == 2
    assert f"{bad} is not a checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "transnext_femto", "--checkpoint",
              str(tmp_path / "missing.pth"), "--data-dir", str(tiny_folder)])
    assert e.value.code == 2
    assert "--checkpoint: file not found" in capsys.readouterr().err


def test_predict_corrupt_image_names_file(constant_ckpt, tmp_path, model_name, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    assert main(["predict", str(bad), "--model", model_name, "--checkpoint",
                 str(constant_ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {bad}" in err and "Traceback" not in err
    assert main(["predict", str(tmp_path / "nope.png"), "--model", model_name,
                 "--checkpoint", str(constant_ckpt)]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_predict_imagenet_names(constant_ckpt, tmp_path, model_name, capsys):
    img = make_image_folder(tmp_path / "x", ["k"], 1) / "k" / "img_0.png"
    assert main(["predict", str(img), "--model", model_name, "--checkpoint",
                 str(constant_ckpt), "--topk", "2", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "tench (0)" in out and "(6)" in out
