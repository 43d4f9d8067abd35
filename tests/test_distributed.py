"""A real two-process torchrun (gloo on CPU): the first step's loss and gradients equal a
one-process run on the same global batch, and distributed evaluation counts every
sample exactly once on an uneven last shard."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import PY, REPO, free_port, subprocess_env


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}"
    return p


def _run_together(*cmds):
    """Start the commands at once (independent runs: the one-process run beside the pair)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(_run, cmds))


def torchrun(nproc, *args):
    return [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "transnext", *args]


def test_two_process_first_step_equals_one_process(tiny_folder, tmp_path, model_name):
    common = ["train", "--model", model_name, "--data-dir", str(tiny_folder), "--epochs", "1",
              "--input-size", "32", "--workers", "0", "--train-aug", "none", "--drop-path", "0",
              "--no-progress", "--no-tensorboard", "--seed", "0", "--stop-after-epochs", "1"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _, p = _run_together(
        [PY, "-m", "transnext", *common, "--batch-size", "8", "--output", str(tmp_path / "o1"),
         "--debug-first-step", str(one)],
        torchrun(2, *common, "--batch-size", "4", "--output", str(tmp_path / "o2"),
                 "--debug-first-step", str(two)))
    assert "2 ranks" in p.stderr
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a["count"] == b["count"] == 8
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for k, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # both wrote checkpoints, only rank 0 of the pair
    assert (tmp_path / "o2" / "last.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == sorted(
        p.name for p in (tmp_path / "o1").iterdir())


def test_distributed_eval_uneven_shards(tiny_folder, tmp_path, model_name):
    """9 validation images over 2 ranks (5 + 4): same count and accuracy as one process."""
    out = tmp_path / "run"
    _run([PY, "-m", "transnext", "train", "--model", model_name, "--data-dir", str(tiny_folder),
          "--epochs", "1", "--input-size", "32", "--batch-size", "8", "--workers", "0",
          "--no-progress", "--no-tensorboard", "--output", str(out)])
    ev = ["eval", "--model", model_name, "--checkpoint", str(out / "last.pth"), "--data-dir",
          str(tiny_folder), "--input-size", "32", "--batch-size", "2", "--workers", "0"]
    _run_together([PY, "-m", "transnext", *ev, "--json", str(tmp_path / "e1.json")],
                  torchrun(2, *ev, "--json", str(tmp_path / "e2.json")))
    r1 = json.loads((tmp_path / "e1.json").read_text())["rows"][0]
    r2 = json.loads((tmp_path / "e2.json").read_text())["rows"][0]
    assert r1["count"] == r2["count"] == 9
    assert r2["top1"] == pytest.approx(r1["top1"])
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def _averager_worker(rank, port, out):
    import torch.distributed as dist
    from torch import nn

    from transnext.engine.distributed import GradientAverager
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(rank)  # each rank starts from other weights
        m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3, bias=False))
        m[2].weight.data = m[2].weight.data.double()  # a second dtype: a second bucket
        unused = nn.Parameter(torch.ones(4))
        m.register_parameter("unused", unused)
        partly = nn.Parameter(torch.ones(6))  # reached by rank 1's batch only
        m.register_parameter("partly", partly)
        sync = GradientAverager(m, bucket_mb=100 / 2**20, uneven=True)  # 100-byte buckets
        for p in m.parameters():
            if p is not unused and (p is not partly or rank == 1):
                p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(
                    p.numel(), dtype=p.dtype).view_as(p)
        sync()
        torch.save({"state": m.state_dict(), "grads": {n: p.grad for n, p in
                                                       m.named_parameters()}}, out[rank])
    finally:
        dist.destroy_process_group()


def test_gradient_averager_with_a_real_process_group(tmp_path):
    """engine.distributed.GradientAverager (--cuda-graphs under torchrun, no DDP): rank 0's
    parameters and buffers on both ranks, and the mean of the ranks' gradients, bucketed
    across dtypes; a parameter without a gradient on every rank stays without one, and with
    ``uneven`` one that only rank 1's batch reached is averaged with rank 0's zeros."""
    import torch.multiprocessing as mp
    out = [str(tmp_path / f"r{i}.pt") for i in range(2)]
    mp.spawn(_averager_worker, args=(free_port(), out), nprocs=2)
    r0, r1 = (torch.load(f, weights_only=True) for f in out)
    for k, v in r0["state"].items():
        assert torch.equal(r1["state"][k], v), k
    torch.manual_seed(0)  # rank 0's initial weights
    assert torch.equal(r0["state"]["0.weight"], nn_linear_weight(5, 7))
    for name, g in r0["grads"].items():
        if name == "unused":
            assert g is None and r1["grads"][name] is None
            continue
        ramp = torch.arange(g.numel(), dtype=g.dtype).view_as(g)
        # mean of 1x and 2x; "partly": of rank 0's zeros (uneven) and 2x
        torch.testing.assert_close(g, (1.0 if name == "partly" else 1.5) * ramp, msg=name)
        assert torch.equal(r1["grads"][name], g), name


def nn_linear_weight(i, o):
    from torch import nn
    return nn.Linear(i, o).weight.data
