"""Detector training step and inference: TransNeXt-T against ConvNeXt-T (timm,
features_only) under the same detector, one run. ``--arch mask-rcnn``:
``tasks.detection.build_maskrcnn`` (mmdet's FPN, RPN, RoI heads and transform);
``--arch dino-4scale`` / ``dino-5scale``: ``tasks.detection.build_dino`` (channel mapper,
deformable encoder/decoder, denoising queries, Hungarian-matched losses).

    python benchmarks/bench_det.py --out benchmarks/results/det_h100.json
    python benchmarks/bench_det.py --arch dino-4scale --out benchmarks/results/dino_h100.json
    python benchmarks/bench_det.py --modes eager graphs   # and as `det train/eval --cuda-graphs`

Training: batch 2 at 1333x800 (the 1x recipe's per-GPU batch), 12 instances per
image (with masks for Mask R-CNN), bf16 autocast, forward + backward + AdamW step.
Inference: one 800x1333 image at a time (as mmdet tests), bf16, boxes (and pasted masks).
``--infer-shapes N``: also N images of N sizes (800 x 1344, 800 x 1312, ... : N padded shapes,
as a val set has), one pass timed whole (the graphs rows record a graph per size there) and
a second pass (replays).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed  # noqa: E402

from transnext.tasks.detection.canvas import (  # noqa: E402
    graph_holder, train_canvases, use_canvases)
from transnext.tasks.detection.dino import build_dino  # noqa: E402
from transnext.tasks.detection.maskrcnn import build_maskrcnn, mmdet_init_  # noqa: E402


class TimmFPN(nn.Module):
    """A timm features_only body under the same FPN as TransNeXtFPN."""

    def __init__(self, name: str, out_channels: int = 256):
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


def make(name: str, h: int, w: int, arch: str = "mask-rcnn", queries: int = 900):
    # the transform keeps the benchmark's size (the recipes' 800/1333 by default)
    if arch.startswith("dino"):
        levels = 5 if arch == "dino-5scale" else 4
        if name.startswith("transnext"):
            return build_dino(name, 80, num_levels=levels, min_size=min(h, w),
                              max_size=max(h, w), num_queries=queries)
        import timm
        body = timm.create_model(name, features_only=True,
                                 out_indices=(0, 1, 2, 3) if levels == 5 else (1, 2, 3))
        return build_dino(backbone=body, num_classes=80, num_levels=levels,
                          min_size=min(h, w), max_size=max(h, w), num_queries=queries)
    net = build_maskrcnn("transnext_tiny" if not name.startswith("transnext") else name, 80,
                         min_size=min(h, w), max_size=max(h, w))
    if not name.startswith("transnext"):
        net.backbone = TimmFPN(name)
        mmdet_init_(net)
    return net


def targets(n_img: int, h: int, w: int, n: int, device, gen, masks_too: bool = True):
    out = []
    for _ in range(n_img):
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([w / 3, h / 3]) + 16
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0 + (x1 - x0) // 4:x1] = 1  # not the whole box
        t = {"boxes": boxes.to(device), "labels": torch.randint(1, 81, (n,), generator=gen)
             .to(device)}
        if masks_too:
            t["masks"] = masks.to(device)
        out.append(t)
    return out


def use_graphs(model, name: str, arch: str, h: int, w: int) -> None:
    """`det train --cuda-graphs`: training batches padded to the canvases, the backbone's
    forward and backward replayed from one graph per canvas; `det eval --cuda-graphs`: its
    inference forward from a graph per padded shape. A timm baseline's body too, so that
    both models of a ratio run the same way."""
    from transnext.engine.cuda_graphs import INFER_GRAPHS, GraphedForward
    canvases = train_canvases(min(h, w), max(h, w))
    use_canvases(model, canvases)
    n = len(canvases)
    if name.startswith("transnext"):
        graph_holder(model).use_cuda_graphs(infer=True, max_graphs=n,
                                            max_infer_graphs=INFER_GRAPHS)
    elif arch.startswith("dino"):
        model.backbone = GraphedForward(model.backbone, max_graphs=n,
                                        max_infer_graphs=INFER_GRAPHS)
    else:
        model.backbone.body = GraphedForward(model.backbone.body, max_graphs=n,
                                             max_infer_graphs=INFER_GRAPHS)


def bench(name, args, device, mode: str = "eager"):
    if device == "cuda":  # the previous row's cached blocks (and graph pools) are not this one's
        gc.collect()
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    h, w = args.size
    model = make(name, h, w, args.arch, args.queries).to(device)
    if mode == "graphs":
        use_graphs(model, name, args.arch, h, w)
    res = {"model": name, "mode": mode,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    imgs = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(args.batch)]
    tg = targets(args.batch, h, w, args.instances, device, gen,
                 masks_too=not args.arch.startswith("dino"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                            fused=device == "cuda")
    model.train()

    def train_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = sum(model(imgs, tg).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    s = timed(train_step, args.iters, args.repeats, device)
    res.update(train_ms_step=s * 1000, train_img_s=args.batch / s)
    if device == "cuda" and mode == "graphs":
        # the graphs' memory pools are reserved, not allocated: the process's reserved peak
        res["train_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    elif device == "cuda":
        res["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    one = [imgs[0]]

    @torch.no_grad()
    def infer():
        with torch.autocast(device, dtype=torch.bfloat16):
            model(one)

    for _ in range(args.warmup):
        infer()
    s = timed(infer, args.iters, args.repeats, device)
    res.update(infer_ms_img=s * 1000, infer_img_s=1 / s)
    if args.infer_shapes:
        sizes = [(h, w - 32 * i) for i in range(args.infer_shapes)]
        many = [torch.rand(3, a, b, generator=gen).to(device) for a, b in sizes]

        @torch.no_grad()
        def one_pass():
            for im in many:
                with torch.autocast(device, dtype=torch.bfloat16):
                    model([im])

        for name in ("first_pass", "second_pass"):  # the first records the graphs
            res[f"{name}_ms_img"] = timed(one_pass, 1, 1, device) * 1000 / len(many)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["transnext_tiny", "convnext_tiny"],
                   help="the last one is the baseline of the ratios")
    p.add_argument("--arch", default="mask-rcnn",
                   choices=["mask-rcnn", "dino-4scale", "dino-5scale"])
    p.add_argument("--queries", type=int, default=900, help="DINO queries (small sizes: fewer)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--instances", type=int, default=12)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "graphs"],
                   help="graphs: as `det train --cuda-graphs` and `det eval --cuda-graphs` "
                        "(CUDA only)")
    p.add_argument("--infer-shapes", type=int, default=0, metavar="N",
                   help="also time inference over N image sizes (N padded shapes), a first "
                        "pass (graphs recorded) and a second")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if "graphs" in args.modes and args.device != "cuda":
        p.error("--modes graphs needs a CUDA device")
    rows = []
    for mode in args.modes:
        rows += [bench(m, args, args.device, mode) for m in args.models]
        base = rows[-1]
        for r in rows[-len(args.models):-1]:
            r["train_ratio"] = r["train_img_s"] / base["train_img_s"]
            if "infer_img_s" in r:
                r["infer_ratio"] = r["infer_img_s"] / base["infer_img_s"]
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda"
            else platform.processor(), "torch": torch.__version__, "batch": args.batch,
            "size": args.size, "instances": args.instances, "arch": args.arch}
    print(f"{args.arch}, {meta['device']}, torch {meta['torch']}, batch {args.batch} at "
          f"{args.size[0]}x{args.size[1]}, bf16")
    print(table(rows, [("model", "backbone", "s"), ("mode", "mode", "s"),
                       ("train_ms_step", "train ms/step", ".1f"),
                       ("train_ratio", "train ratio", ".2f"),
                       ("train_peak_GiB", "train peak GiB", ".2f"),
                       ("train_reserved_GiB", "graphs: reserved GiB", ".2f"),
                       ("infer_ms_img", "infer ms/img", ".1f"),
                       ("infer_ratio", "infer ratio", ".2f"),
                       ("first_pass_ms_img", "N sizes: 1st pass ms/img", ".1f"),
                       ("second_pass_ms_img", "2nd pass ms/img", ".1f")]))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
