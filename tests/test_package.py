"""The distribution: `python -m build` makes an sdist and a wheel; the wheel, installed into
a fresh virtual environment, runs the console script (torch etc. taken from this
environment, so nothing is downloaded)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

DIST = "transnext_pytorch"
DATA = {"imagenet_classes.txt", "imagenet_wnids.txt", "fashion_mnist_classes.txt",
        "imagenet_a_wnids.txt", "imagenet_r_wnids.txt", "imagenet_c_alexnet_errors.txt"}


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                        str(src)], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    wheel = next(out.glob(f"{DIST}-*.whl"))
    sdist = next(out.glob(f"{DIST}-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert DATA <= {Path(n).name for n in names if n.startswith("transnext/data/")}
    assert any(n.endswith("entry_points.txt") for n in names)
    with tarfile.open(sdist) as t:
        assert DATA <= {Path(n).name for n in t.getnames() if "/src/transnext/data/" in n}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    vpy = venv / "bin" / "python"
    # this environment's packages (torch, timm, ...) after the venv's own, through a .pth
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    (Path(site.strip()) / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                       env=_clean_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]

    exe = venv / "bin" / "transnext"
    run = dict(capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    p = subprocess.run([str(exe), "--help"], **run)
    assert p.returncode == 0, p.stderr
    for sub in ("train", "eval", "predict", "info", "export", "erf", "attention-map"):
        assert sub in p.stdout
    p = subprocess.run([str(exe), "info", "transnext_femto"], **run)
    assert p.returncode == 0 and "1,942,470" in p.stdout, p.stderr
    # the installed copy, not the source tree, with its class-name files
    p = subprocess.run([str(vpy), "-c", "import transnext, transnext.data.names as n; "
                        "print(transnext.__file__); print(len(n.default_class_names(1000)))"],
                       **run)
    assert p.returncode == 0, p.stderr
    where, count = p.stdout.split()
    assert where.startswith(str(venv)) and count == "1000"
