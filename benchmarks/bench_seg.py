"""UperNet training step and sliding-window inference: TransNeXt-T against
ConvNeXt-T (timm, through transformers' TimmBackbone) under the same
transformers UperNet head (512 channels, auxiliary head, 150 classes), one run.

    python benchmarks/bench_seg.py --out benchmarks/results/seg_h100.json

Training: batch 8 at 512x512, bf16 autocast, forward + backward + AdamW step.
Inference: sliding window 512 / stride 341 on 512x683 images (2 windows each),
batch 1 as mmseg, bf16. ``--crop C`` scales all three (C, 2C/3, 4C/3; the tests' CPU run
uses 128). Median of --repeats windows of --iters steps (CUDA events).
``--cuda-graphs``: each backbone's training forward and backward, and its inference
forward, replayed from CUDA graphs (what ``transnext seg train --cuda-graphs`` and ``seg
eval --cuda-graphs`` do for TransNeXt), the heads eager.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from transformers import TimmBackboneConfig, UperNetConfig  # noqa: E402
from transformers.modeling_outputs import BackboneOutput  # noqa: E402

from transnext.engine.cuda_graphs import GraphedForward  # noqa: E402

from transnext.tasks.segmentation.inference import slide  # noqa: E402
from transnext.tasks.segmentation.model import TransNeXtUperNet, build_upernet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed  # noqa: E402


def make(name: str, crop: int = 512):
    if name.startswith("transnext"):
        return build_upernet(name, 150, pos_bias="interpolate", img_size=crop)
    cfg = UperNetConfig(backbone_config=TimmBackboneConfig(backbone=name, out_indices=[0, 1, 2, 3]),
                        num_labels=150, hidden_size=512, auxiliary_channels=256)
    return TransNeXtUperNet(cfg)


class _Maps(torch.nn.Module):
    """A transformers backbone's feature maps as a tuple (what a graph records)."""

    def __init__(self, backbone, forward):
        super().__init__()
        self.backbone, self.call = backbone, forward

    def forward(self, x):
        return tuple(self.call(x).feature_maps)


def graph_backbone(model) -> None:
    """--cuda-graphs: TransNeXt's own switch; other backbones the same wrapper."""
    bb = model.backbone
    if hasattr(bb, "use_cuda_graphs"):
        bb.use_cuda_graphs(train=True, infer=True)
        return
    graphed = GraphedForward(_Maps(bb, bb.forward))
    bb.forward = lambda pixel_values, *a, **k: BackboneOutput(feature_maps=graphed(pixel_values))


def bench(name, args, device):
    torch.manual_seed(0)
    if device == "cuda":  # not the previous model's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = make(name, args.crop).to(device).to(memory_format=torch.channels_last)
    res = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    dt = torch.bfloat16
    c = args.crop
    x = torch.randn(args.batch, 3, c, c, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (args.batch, c, c), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=device == "cuda")
    net = torch.compile(model) if args.compile else model
    if args.cuda_graphs:
        graph_backbone(model)
    model.train()

    def train_step():
        with torch.autocast(device, dtype=dt):
            loss = net(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    if device == "cuda":
        torch.cuda.synchronize()
        if not args.cuda_graphs:  # a graph's memory is taken when it is recorded
            torch.cuda.reset_peak_memory_stats()
    s = timed(train_step, args.iters, args.repeats, device)
    res["train_img_s"] = args.batch / s
    res["train_ms_step"] = s * 1000
    if device == "cuda":
        res["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del opt
    model.eval()
    img = torch.randn(1, 3, c, round(c * 4 / 3), device=device)

    @torch.no_grad()
    def infer():
        with torch.autocast(device, dtype=dt):
            slide(net, img, c, c * 2 // 3)

    for _ in range(args.warmup):
        infer()
    s = timed(infer, args.iters, args.repeats, device)
    res["slide_img_s"] = 1 / s
    res["slide_ms_img"] = s * 1000
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["transnext_tiny", "convnext_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=512, help="training crop and sliding window")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import transformers
    rows = [bench(m, args, args.device) for m in args.models]
    base = rows[-1]
    for r in rows[:-1]:
        r["train_ratio"] = r["train_img_s"] / base["train_img_s"]
        r["slide_ratio"] = r["slide_img_s"] / base["slide_img_s"]
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "batch": args.batch,
            "crop": args.crop,
            "settings": {k: v for k, v in os.environ.items() if k.startswith("TRANSNEXT_")}}
    print(f"UperNet, {meta['device']}, torch {meta['torch']}, batch {args.batch} at "
          f"{args.crop}x{args.crop}, bf16"
          + (", backbones in CUDA graphs" if args.cuda_graphs else ""))
    print(table(rows, [("model", "backbone", "s"), ("train_ms_step", "train ms/step", ".1f"),
                       ("train_img_s", "train img/s", ".1f"), ("train_ratio", "train ratio", ".2f"),
                       ("train_peak_GiB", "train peak GiB", ".2f"),
                       ("slide_ms_img", "slide ms/img", ".1f"), ("slide_ratio", "slide ratio", ".2f")]))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
