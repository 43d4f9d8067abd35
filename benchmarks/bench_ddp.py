"""Multi-GPU runs of the real ``transnext train`` / ``eval`` / ``seg train`` under torchrun.

What it measures, all on one machine in one call (README, "Multi-GPU"):

* scaling: ``transnext train`` on 1, 2, ... GPUs at the same per-GPU batch, the data
  pipeline in the loop (JPEG decode, timm augmentation, workers, pinned memory). The
  global batch is kept equal with ``--accum-steps`` (n_max / n), so the loss curves are
  comparable; img/s is the training throughput of the steady epochs (all but the first).
  Scaling efficiency = img/s on n / (n x img/s on 1).
* resume: on n_max GPUs with ``--deterministic``, a run stopped after one epoch and
  resumed, against the same run uninterrupted: the final weights must be equal.
* first step: the first update's loss and all-reduced gradients on 1 GPU at batch
  n_max * b against n_max GPUs at batch b (fp32, no stochastic depth).
* evaluation: ``transnext eval`` of the n_max checkpoint on 1 process and on n_max.
* segmentation (``--seg``): ``transnext seg train`` (UperNet, SyncBN) on 1 GPU at batch
  2b and on 2 GPUs at batch b: the first iterations' losses (means over all ranks).

Data: Fashion-MNIST written as an ImageFolder of RGB JPEGs (``--image-size`` px), so
the pipeline decodes real files as it would on ImageNet.

    python benchmarks/bench_ddp.py --fmnist DIR --work /tmp/ddp --gpus 1 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_one(job):
    path, pixels, size = job
    from PIL import Image
    im = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC)
    im.save(path, quality=90)


def make_imagefolder(fmnist: str | None, out: Path, n_train: int, n_val: int, size: int) -> Path:
    """Fashion-MNIST as out/{train,val}/<class>/<i>.jpg (the first n of each split)."""
    sys.path.insert(0, str(ROOT / "src"))
    from transnext.data.fashion_mnist import load_fashion_mnist
    from transnext.data.names import fashion_mnist_classes
    if (out / ".done").exists():
        return out
    names = [n.replace("/", "-").replace(" ", "_") for n in fashion_mnist_classes()]
    jobs = []
    for split, src, n in (("train", "train", n_train), ("val", "test", n_val)):
        images, labels = load_fashion_mnist(fmnist, src)
        for c in names:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(min(n, len(images))):
            jobs.append((str(out / split / names[int(labels[i])] / f"{i:05d}.jpg"),
                         images[i].numpy().astype(np.uint8), size))
    with Pool(min(32, os.cpu_count() or 1)) as pool:
        pool.map(_write_one, jobs, chunksize=256)
    (out / ".done").write_text("")
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (device README)
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    return env


def _launch(n: int, args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "transnext", *args] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
        "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "transnext", *args]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if rc != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}")
    return time.time() - t0


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def scaling(a, data: Path, work: Path) -> list[dict]:
    n_max = max(a.gpus)
    rows = []
    for n in a.gpus:
        out = work / f"scale_{n}"
        cmd = ["train", "--model", a.model, "--data-dir", str(data), "--output", str(out),
               "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
               "--accum-steps", str(n_max // n), "--amp", "bf16", "--workers", str(a.workers),
               "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
               "--warmup-epochs", "1", "--sched", "cosine", "--drop-path", "0.1",
               "--input-size", "224", "--no-ema", "--no-repeated-aug", "--seed", "0",
               "--no-progress", "--no-tensorboard", "--eval-batch-size", "256"]
        if a.compile_mode:
            cmd += ["--compile-mode", a.compile_mode]
        wall = _launch(n, cmd, work / f"scale_{n}.log")
        m = _metrics(out)
        steady = [r["train_img_per_s"] for r in m[1:]] or [m[0]["train_img_per_s"]]
        rows.append({"gpus": n, "per_gpu_batch": a.batch_size, "accum": n_max // n,
                     "global_batch": a.batch_size * n_max, "wall_s": wall,
                     "img_per_s": float(np.median(steady)),
                     "loss": [r["train_loss"] for r in m],
                     "val_top1": [r.get("val_top1") for r in m]})
    one = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["efficiency"] = r["img_per_s"] / (r["gpus"] * one["img_per_s"]) if one else None
    return rows


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def resume(a, data: Path, work: Path) -> dict:
    n = max(a.gpus)
    base = ["train", "--model", a.model, "--data-dir", str(data), "--epochs", "2",
            "--batch-size", str(a.batch_size), "--amp", "bf16", "--workers", str(a.workers),
            "--deterministic", "--no-repeated-aug", "--no-ema", "--input-size", "224",
            "--seed", "1", "--no-progress", "--no-tensorboard", "--drop-path", "0.1"]
    _launch(n, base + ["--output", str(work / "straight")], work / "straight.log")
    _launch(n, base + ["--output", str(work / "stopped"), "--stop-after-epochs", "1"],
            work / "stopped_1.log")
    _launch(n, base + ["--output", str(work / "stopped"), "--resume",
                       str(work / "stopped" / "last.pth")], work / "stopped_2.log")
    s, r = _weights(work / "straight" / "last.pth"), _weights(work / "stopped" / "last.pth")
    diff = max((s[k].float() - r[k].float()).abs().max().item() for k in s)
    return {"gpus": n, "equal": all(torch.equal(s[k], r[k]) for k in s), "max_abs_diff": diff,
            "loss_straight": [m["train_loss"] for m in _metrics(work / "straight")],
            "loss_resumed": [m["train_loss"] for m in _metrics(work / "stopped")]}


def first_step(a, data: Path, work: Path) -> dict:
    """The first update's global loss and all-reduced gradients: 1 GPU at batch
    n_max * b against n_max GPUs at batch b (fp32, no stochastic depth)."""
    n = max(a.gpus)
    dumps = {}
    for k, b in ((1, n * a.batch_size), (n, a.batch_size)):
        dumps[k] = work / f"first_{k}.pt"
        _launch(k, ["train", "--model", a.model, "--data-dir", str(data), "--epochs", "1",
                    "--batch-size", str(b), "--amp", "none", "--workers", str(a.workers),
                    "--no-repeated-aug", "--no-ema", "--input-size", "224", "--drop-path", "0",
                    "--seed", "2", "--no-progress", "--no-tensorboard", "--stop-after-epochs",
                    "1", "--output", str(work / f"first_{k}"), "--debug-first-step",
                    str(dumps[k])], work / f"first_{k}.log")
    one, many = (torch.load(dumps[k], weights_only=True) for k in (1, n))
    g1, g2 = one["grads"], many["grads"]
    total = torch.cat([g.flatten() for g in g1.values()])
    diff = torch.cat([(g1[k] - g2[k]).flatten() for k in g1])
    # per tensor, leaving out gradients that are ~0 by symmetry (e.g. a bias added to every
    # logit of a softmax), whose relative error is noise over noise
    big = max(g.norm().item() for g in g1.values())
    rel = {k: ((g1[k] - g2[k]).norm() / g1[k].norm()).item() for k in g1
           if g1[k].norm().item() > 1e-4 * big}
    worst = max(rel, key=rel.get)
    return {"gpus": n, "loss_1": one["loss"], f"loss_{n}": many["loss"],
            "count": [one["count"], many["count"]], "params_compared": len(rel),
            "params": len(g1), "grad_rel_err_all": (diff.norm() / total.norm()).item(),
            "grad_rel_err_max": rel[worst], "grad_rel_err_worst_param": worst}


def evaluation(a, data: Path, work: Path) -> dict:
    n = max(a.gpus)
    ck = work / f"scale_{n}" / "last.pth"
    res = {}
    for k in sorted({1, n}):
        j = work / f"eval_{k}.json"
        _launch(k, ["eval", "--model", a.model, "--checkpoint", str(ck), "--data-dir", str(data),
                    "--input-size", "224", "--batch-size", "250", "--amp", "bf16", "--workers",
                    str(a.workers), "--json", str(j)], work / f"eval_{k}.log")
        res[k] = json.loads(j.read_text())
    return {str(k): v for k, v in res.items()}


def segmentation(a, work: Path) -> dict:
    mos = work / "mosaics"
    if not (mos / "classes.txt").exists():
        args = ["seg", "make-mosaics", "--output", str(mos), "--train", "2000", "--val", "100"]
        if a.fmnist:
            args += ["--fashion-mnist-dir", a.fmnist]
        _launch(1, args, work / "mosaics.log")
    res = {}
    for n, b in ((1, 2 * a.seg_batch), (2, a.seg_batch)):
        out = work / f"seg_{n}"
        _launch(n, ["seg", "train", "--recipe", "upernet-fmnist", "--model", a.seg_model,
                    "--data-dir", str(mos), "--output", str(out), "--iters", str(a.seg_iters),
                    "--batch-size", str(b), "--crop-size", str(a.seg_crop), "--scale",
                    str(4 * a.seg_crop), str(a.seg_crop),
                    "--pretrain-size", "224", "--channels", "512", "--aux-channels", "256",
                    "--amp", "bf16", "--workers", "4", "--log-interval", "1",
                    "--time-budget", "0", "--eval-interval",
                    str(10 ** 9), "--ckpt-interval", str(10 ** 9), "--no-progress",
                    "--no-tensorboard", "--seed", "0"], work / f"seg_{n}.log")
        res[str(n)] = {"batch": b, "loss": [r["train_loss"] for r in _metrics(out)
                                            if "train_loss" in r]}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch folder")
    p.add_argument("--fmnist", default=None, help="Fashion-MNIST idx folder")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="transnext_tiny")
    p.add_argument("--batch-size", type=int, default=128, help="per GPU")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--val-images", type=int, default=10000)
    p.add_argument("--image-size", type=int, default=256, help="side of the written JPEGs")
    p.add_argument("--workers", type=int, default=8, help="loader workers per process")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--parts", nargs="+", default=["scaling", "first-step", "resume", "eval",
                                                  "seg"],
                   choices=["scaling", "first-step", "resume", "eval", "seg"])
    p.add_argument("--seg-batch", type=int, default=4, help="per GPU on 2 GPUs")
    p.add_argument("--seg-iters", type=int, default=20)
    p.add_argument("--seg-model", default="transnext_tiny")
    p.add_argument("--seg-crop", type=int, default=256)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
           "model": a.model, "compile_mode": a.compile_mode}
    def save():  # after every part: a run cut short keeps what it measured
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))

    t = time.time()
    data = make_imagefolder(a.fmnist, work / "fmnist_jpg", a.train_images, a.val_images,
                            a.image_size)
    print(f"data ready in {time.time() - t:.0f}s", flush=True)
    if "scaling" in a.parts:
        res["scaling"] = scaling(a, data, work)
        print("\n| GPUs | per-GPU batch | accum | img/s | efficiency | loss per epoch | val top-1 |")
        print("|---|---|---|---|---|---|---|")
        for r in res["scaling"]:
            print(f"| {r['gpus']} | {r['per_gpu_batch']} | {r['accum']} | {r['img_per_s']:.0f} | "
                  f"{r['efficiency']:.3f} | {' '.join(f'{x:.3f}' for x in r['loss'])} | "
                  f"{' '.join(f'{x:.2f}' for x in r['val_top1'] if x is not None)} |", flush=True)
        save()
    small = make_imagefolder(a.fmnist, work / "fmnist_small", 20 * a.batch_size * max(a.gpus),
                             1000, a.image_size)
    if "first-step" in a.parts:
        res["first_step"] = f = first_step(a, small, work)
        print(f"\nfirst step, 1 GPU at batch {max(a.gpus) * a.batch_size} vs {f['gpus']} GPUs at "
              f"batch {a.batch_size}: loss {f['loss_1']:.6f} vs {f['loss_' + str(f['gpus'])]:.6f}, "
              f"gradient relative error {f['grad_rel_err_all']:.2e} (all), max per tensor "
              f"{f['grad_rel_err_max']:.2e} ({f['grad_rel_err_worst_param']}; "
              f"{f['params_compared']} of {f['params']} tensors)", flush=True)
        save()
    if "resume" in a.parts:
        res["resume"] = r = resume(a, small, work)
        print(f"\nresume on {r['gpus']} GPUs: weights equal {r['equal']} (max abs diff "
              f"{r['max_abs_diff']:.3g}); losses {r['loss_straight']} vs {r['loss_resumed']}",
              flush=True)
        save()
    if "eval" in a.parts and "scaling" in a.parts:
        res["eval"] = e = evaluation(a, data, work)
        print("\neval: " + ", ".join(f"{k} process(es) top-1 {v['rows'][0]['top1']:.3f} "
                                     f"({v['rows'][0].get('count', '?')} images)"
                                     for k, v in e.items()), flush=True)
        save()
    if "seg" in a.parts:
        res["seg"] = s = segmentation(a, work)
        print("\nseg train loss per iteration (1 GPU at batch 2b | 2 GPUs at batch b):")
        for i, (x, y) in enumerate(zip(s["1"]["loss"], s["2"]["loss"])):
            print(f"  iter {i + 1}: {x:.4f} | {y:.4f}")
        save()


if __name__ == "__main__":
    main()
