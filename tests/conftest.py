"""Shared fixtures: tiny real image trees (PNG and JPEG files) for the job tests."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One intra-op thread in the test process: on a loaded 2-core machine two
    spinning OpenMP threads per process slow small ops down by up to ~40x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# the colour that makes each class recognisable (training can learn it in a few steps)
_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 220, 40)]


def write_image(path: Path, cls: int, seed: int, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    base = np.array(_COLOURS[cls % len(_COLOURS)], dtype=np.float32)
    img = base + rng.normal(0, 25, (size, size, 3))
    y0, x0 = rng.integers(0, size // 2, 2)
    img[y0:y0 + size // 3, x0:x0 + size // 3] = 255 - base  # a patch, so images differ
    img = np.clip(img, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def make_image_folder(root: Path, classes, per_class: int, seed: int = 0, size: int = 32,
                      ext_cycle=(".png", ".jpg")) -> Path:
    """root/<class>/img_<i>.<png|jpg>: real encoded files, alternating formats."""
    for ci, name in enumerate(classes):
        for i in range(per_class):
            ext = ext_cycle[i % len(ext_cycle)]
            write_image(root / name / f"img_{i}{ext}", ci, seed * 1000 + ci * 100 + i, size)
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A train/val ImageFolder: 3 classes, 8 train and 3 val images each (PNG + JPEG)."""
    root = tmp_path_factory.mktemp("tiny_folder")
    classes = ["cat", "dog", "fish"]
    make_image_folder(root / "train", classes, 8, seed=1)
    make_image_folder(root / "val", classes, 3, seed=2)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun(*args) -> list[str]:
    """``transnext ARGS`` as two local processes under torch.distributed.run (gloo)."""
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "transnext", *args]


def run_ok(cmd):
    """Run a command from the repo root; fail with the ends of its output unless it exits 0."""
    import subprocess
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"STDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="session")
def model_name() -> str:
    """The tiny model the job tests train (TransNeXt-femto)."""
    return "transnext_femto"


FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist "
                                                               "is not installed")


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory):
    """8 training and 5 held-out 64 px instance mosaics in COCO's layout (the det tests)."""
    if not FMNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from transnext.cli import main
    root = tmp_path_factory.mktemp("det_mosaics")
    assert main(["det", "make-mosaics", "--output", str(root), "--train", "8", "--val", "5",
                 "--size", "64", "--seed", "1"]) == 0
    return root


def graphs_follow_eager(run, tmp_path, caplog, replays: int, steps: int | None = None,
                        evals: int | None = None):
    """``run(out, *extra)`` (a training job, returning its logged losses) eagerly and with
    ``--cuda-graphs``: every step replayed, none eager, and the same losses to 1% (the first
    ``steps`` of them, where later ones depend on discrete choices). ``evals``: the
    validation forwards the dense jobs replay from inference graphs. Returns both lists."""
    import logging

    import pytest
    ref = run(tmp_path / "eager")
    with caplog.at_level(logging.INFO, logger="transnext"):
        got = run(tmp_path / "graphs", "--cuda-graphs")
    line = f"CUDA graphs: {replays} call(s) replayed, 0 run eagerly"
    if evals is not None:
        line += f" in training; {evals} replayed, 0 eagerly in evaluation"
    assert line in caplog.text
    assert len(got) == len(ref)
    assert got[:steps] == pytest.approx(ref[:steps], rel=1e-2)
    return ref, got
