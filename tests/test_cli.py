"""The command line: entry points, sub-command wiring, recipes and overrides."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PY, REPO, subprocess_env
from transnext.cli import build_parser, main
from transnext.engine import recipes


def test_python_m_and_console_script_help():
    # both started at once: each start imports torch (seconds of one core)
    exe = Path(sys.executable).parent / "transnext"
    procs = [subprocess.Popen([PY, "-m", "transnext", "--help"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)]
    if exe.exists():
        procs.append(subprocess.Popen([str(exe), "train", "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 0
    for sub in ("train", "eval", "predict", "info"):
        assert sub in outs[0]
    if exe.exists():
        assert procs[1].returncode == 0
        for flag in ("--model", "--data-dir", "--output", "--epochs", "--batch-size",
                     "--input-size", "--recipe", "--pretrained", "--resume", "--device", "--amp",
                     "--compile", "--compile-mode", "--accum-steps"):
            assert flag in outs[1], flag


def test_recipe_presets_and_overrides():
    args = build_parser().parse_args(["train", "--recipe", "in1k-tiny", "--lr", "5e-4",
                                      "--no-repeated-aug"])
    recipes.resolve(args)
    assert args.model == "transnext_tiny" and args.drop_path == 0.25
    assert args.lr == 5e-4  # the flag wins over the preset
    assert args.repeated_aug is False
    assert (args.epochs, args.weight_decay, args.mixup, args.cutmix, args.smoothing) == (
        300, 0.05, 0.8, 1.0, 0.1)
    assert args.aa == "rand-m9-mstd0.5-inc1" and args.reprob == 0.25 and args.clip_grad == 1.0
    assert (args.warmup_epochs, args.warmup_lr, args.min_lr) == (5, 1e-6, 1e-5)
    ft = build_parser().parse_args(["train", "--recipe", "ft384-base"])
    recipes.resolve(ft)
    assert (ft.input_size, ft.epochs, ft.lr, ft.drop_path, ft.cutmix) == (384, 5, 1e-5, 0.8, 0.0)
    for name in ("in1k-micro", "in1k-small", "in1k-base", "ft384-small"):
        assert name in recipes.RECIPES


def test_weight_decay_exclusions_reach_the_optimizer():
    import timm.optim
    import transnext
    m = transnext.create_model("transnext_femto", num_classes=10)
    opt = timm.optim.create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    assert any("query_embedding" in n for n in no_decay)
    assert any("relative_pos_bias_local" in n for n in no_decay)
    assert any("temperature" in n for n in no_decay)
    assert any(".cpb_fc1.weight" in n for n in no_decay)
    assert not any(n.endswith("mlp.fc1.weight") for n in no_decay)


def test_info_subcommand(tmp_path, capsys):
    js = tmp_path / "info.json"
    assert main(["info", "transnext_femto", "--input-size", "32", "--json", str(js)]) == 0
    assert "transnext_femto" in capsys.readouterr().out
    assert js.exists() and json.loads(js.read_text())


def test_unknown_model_and_recipe_messages(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "no_such_model", "--data-dir", str(tmp_path),
              "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown model 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "no-such-recipe"])
