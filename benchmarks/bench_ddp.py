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
* segmentation (``seg``): ``transnext seg train`` (UperNet, SyncBN) on 1 GPU at batch
  2b and on 2 GPUs at batch b: the first iterations' losses (means over all ranks).
* detection (``det``): the same for ``transnext det train`` (Mask R-CNN).
* CUDA graphs (``graphs``): ``transnext train`` and ``transnext seg train`` on the most
  GPUs, eager and with ``--cuda-graphs``: img/s (train, steady epochs), ms per iteration
  (seg, the median over iterations after the first 5) and the loss curves of both.

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


def _train_cmd(a, data: Path, out: Path, accum: int = 1) -> list[str]:
    cmd = ["train", "--model", a.model, "--data-dir", str(data), "--output", str(out),
           "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
           "--accum-steps", str(accum), "--amp", "bf16", "--workers", str(a.workers),
           "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
           "--warmup-epochs", "1", "--sched", "cosine", "--drop-path", "0.1",
           "--input-size", "224", "--no-ema", "--no-repeated-aug", "--seed", "0",
           "--no-progress", "--no-tensorboard", "--eval-batch-size", "256"]
    return cmd + (["--compile-mode", a.compile_mode] if a.compile_mode else [])


def _steady_img_per_s(m: list[dict]) -> float:
    return float(np.median([r["train_img_per_s"] for r in m[1:]] or [m[0]["train_img_per_s"]]))


def scaling(a, data: Path, work: Path) -> list[dict]:
    n_max = max(a.gpus)
    rows = []
    for n in a.gpus:
        out = work / f"scale_{n}"
        wall = _launch(n, _train_cmd(a, data, out, n_max // n), work / f"scale_{n}.log")
        m = _metrics(out)
        rows.append({"gpus": n, "per_gpu_batch": a.batch_size, "accum": n_max // n,
                     "global_batch": a.batch_size * n_max, "wall_s": wall,
                     "img_per_s": _steady_img_per_s(m),
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


def _seg_mosaics(a, work: Path) -> Path:
    mos = work / "mosaics"
    if not (mos / "classes.txt").exists():
        args = ["seg", "make-mosaics", "--output", str(mos), "--train", "2000", "--val", "100"]
        if a.fmnist:
            args += ["--fashion-mnist-dir", a.fmnist]
        _launch(1, args, work / "mosaics.log")
    return mos


def _seg_cmd(a, mos: Path, out: Path, batch: int) -> list[str]:
    return ["seg", "train", "--recipe", "upernet-fmnist", "--model", a.seg_model,
            "--data-dir", str(mos), "--output", str(out), "--iters", str(a.seg_iters),
            "--batch-size", str(batch), "--crop-size", str(a.seg_crop), "--scale",
            str(4 * a.seg_crop), str(a.seg_crop),
            "--pretrain-size", "224", "--channels", "512", "--aux-channels", "256",
            "--amp", "bf16", "--workers", "4", "--log-interval", "1",
            "--time-budget", "0", "--eval-interval",
            str(10 ** 9), "--ckpt-interval", str(10 ** 9), "--no-progress",
            "--no-tensorboard", "--seed", "0"]


def segmentation(a, work: Path) -> dict:
    mos = _seg_mosaics(a, work)
    res = {}
    for n, b in ((1, 2 * a.seg_batch), (2, a.seg_batch)):
        out = work / f"seg_{n}"
        _launch(n, _seg_cmd(a, mos, out, b), work / f"seg_{n}.log")
        res[str(n)] = {"batch": b, "loss": [r["train_loss"] for r in _metrics(out)
                                            if "train_loss" in r]}
    return res


def graphs(a, data: Path, work: Path) -> dict:
    """``train`` and ``seg train`` on the most GPUs, eager and with ``--cuda-graphs``."""
    n = max(a.gpus)
    mos = _seg_mosaics(a, work)
    res = {"gpus": n, "per_gpu_batch": a.batch_size, "seg_per_gpu_batch": a.seg_batch}
    for mode, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        out = work / f"graphs_train_{mode}"
        _launch(n, _train_cmd(a, data, out) + extra, work / f"graphs_train_{mode}.log")
        m = _metrics(out)
        res[f"train_{mode}"] = {"img_per_s": _steady_img_per_s(m),
                                "loss": [r["train_loss"] for r in m]}
        out = work / f"graphs_seg_{mode}"
        _launch(n, _seg_cmd(a, mos, out, a.seg_batch) + extra, work / f"graphs_seg_{mode}.log")
        rows = [r for r in _metrics(out) if "train_loss" in r]
        t = [r["time"] for r in rows]
        res[f"seg_{mode}"] = {"ms_per_iter": float(np.median(np.diff(t[5:]))) * 1e3
                              if len(t) > 6 else None,
                              "loss": [r["train_loss"] for r in rows]}
    return res


def detection(a, work: Path) -> dict:
    """``transnext det train`` (Mask R-CNN) on 1 GPU at batch 2b and 2 GPUs at batch b:
    the first iterations' losses (means over all ranks; RPN/RoI sampling is random per
    rank, so close, not equal)."""
    mos = work / "det_mosaics"
    if not (mos / "annotations" / "instances_val2017.json").exists():
        args = ["det", "make-mosaics", "--output", str(mos), "--train", "400", "--val", "50"]
        if a.fmnist:
            args += ["--fashion-mnist-dir", a.fmnist]
        _launch(1, args, work / "det_mosaics.log")
    res = {}
    for n, b in ((1, 2 * a.det_batch), (2, a.det_batch)):
        out = work / f"det_{n}"
        _launch(n, ["det", "train", "--recipe", "maskrcnn-fmnist", "--model", a.det_model,
                    "--data-dir", str(mos), "--output", str(out), "--batch-size", str(b),
                    "--amp", "bf16", "--workers", "4", "--log-interval", "1",
                    "--time-budget", "0", "--stop-after-iters", str(a.det_iters),
                    "--no-progress", "--no-tensorboard", "--seed", "0"], work / f"det_{n}.log")
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
                                                  "seg", "det"],
                   choices=["scaling", "first-step", "resume", "eval", "seg", "det", "graphs"])
    p.add_argument("--seg-batch", type=int, default=4, help="per GPU on 2 GPUs")
    p.add_argument("--seg-iters", type=int, default=20)
    p.add_argument("--seg-model", default="transnext_tiny")
    p.add_argument("--seg-crop", type=int, default=256)
    p.add_argument("--det-model", default="transnext_tiny")
    p.add_argument("--det-batch", type=int, default=4, help="per GPU on 2 GPUs")
    p.add_argument("--det-iters", type=int, default=20)
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
    if "det" in a.parts:
        res["det"] = d = detection(a, work)
        print("\ndet train loss per iteration (1 GPU at batch 2b | 2 GPUs at batch b):")
        for i, (x, y) in enumerate(zip(d["1"]["loss"], d["2"]["loss"])):
            print(f"  iter {i + 1}: {x:.4f} | {y:.4f}")
        save()
    if "graphs" in a.parts:
        res["graphs"] = g = graphs(a, data, work)
        e, c = g["train_eager"], g["train_graphs"]
        se, sc = g["seg_eager"], g["seg_graphs"]

        def ms(x):
            return "n/a" if x is None else f"{x:.1f}"
        print(f"\n{g['gpus']} GPUs | eager | --cuda-graphs | ratio")
        print("|---|---|---|---|")
        print(f"| train img/s (batch {a.batch_size} per GPU) | {e['img_per_s']:.0f} | "
              f"{c['img_per_s']:.0f} | {c['img_per_s'] / e['img_per_s']:.2f}x |")
        ratio = (f"{se['ms_per_iter'] / sc['ms_per_iter']:.2f}x"
                 if se["ms_per_iter"] and sc["ms_per_iter"] else "n/a")
        print(f"| seg train ms/iter (batch {a.seg_batch} per GPU) | {ms(se['ms_per_iter'])} | "
              f"{ms(sc['ms_per_iter'])} | {ratio} |")
        print("train loss per epoch, eager | graphs: "
              f"{' '.join(f'{x:.4f}' for x in e['loss'])} | "
              f"{' '.join(f'{x:.4f}' for x in c['loss'])}")
        print("seg loss, first 5 iterations, eager | graphs: "
              f"{' '.join(f'{x:.4f}' for x in se['loss'][:5])} | "
              f"{' '.join(f'{x:.4f}' for x in sc['loss'][:5])}", flush=True)
        save()


if __name__ == "__main__":
    main()
