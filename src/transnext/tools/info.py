"""`transnext info`: parameters and GFLOPs of each variant.

Counting convention (the paper's): one multiply-add is one FLOP. Counted are
the matrix products and convolutions (``torch.utils.flop_counter``, halved),
attention matrix products included; the local-window products of aggregated
attention, which the reference computes elementwise, are added analytically
(q.k and the weighted sum of values over the w*w neighbours, plus nothing
else). Normalisations, activations and softmax are not counted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.archs import ARCHS, PRETRAIN_SIZE
from ..models.geometry import stage_size
from ..ops.aggregated_attention import attention_backend

PUBLISHED = ("transnext_micro", "transnext_tiny", "transnext_small", "transnext_base",
             "transnext_micro_aaaa")
# The default table: the README's, femto (ours, unpublished) last.
DEFAULT = PUBLISHED + ("transnext_femto",)


def _local_window_macs(model, H0: int, W0: int) -> int:
    macs = 0
    for i in range(model.num_stages):
        if model.sr_ratios[i] == 1:
            continue
        H, W = stage_size(H0, i), stage_size(W0, i)
        ww = model.window_size ** 2
        macs += model.depths[i] * 2 * H * W * ww * model.embed_dims[i]
    return macs


def count(model, input_size: tuple[int, int, int]) -> dict:
    """Parameters and multiply-adds of one forward pass of a batch of one."""
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, *input_size)
    # the count must see the attention as matrix products, not as a fused kernel
    with attention_backend("reference"), torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model.eval()(x)
    macs = counter.get_total_flops() // 2 + _local_window_macs(model, *input_size[1:])
    return {"params": params, "macs": macs}


def run(names: list[str] | None = None, input_size: int | None = None,
        json_out: str | None = None) -> list[dict]:
    """Print a table of parameters and GFLOPs; optionally write it as JSON."""
    import transnext  # noqa: F401  (registers the models)
    import timm

    names = list(names) if names else list(DEFAULT)
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(ARCHS)}")
    rows = []
    for name in names:
        model = timm.create_model(name)
        size = input_size or model.pretrained_cfg["input_size"][-1]
        chans = model.pretrained_cfg["input_size"][0]
        c = count(model, (chans, size, size))
        rows.append({"model": name, "input_size": size, "params": c["params"],
                     "gflops": c["macs"] / 1e9,
                     "pretrain_size": PRETRAIN_SIZE.get(name, 224)})
    print(f"{'model':<22}{'input':>7}{'params':>14}{'params (M)':>12}{'GFLOPs':>9}")
    for r in rows:
        print(f"{r['model']:<22}{r['input_size']:>7}{r['params']:>14,}"
              f"{r['params'] / 1e6:>12.2f}{r['gflops']:>9.2f}")
    print("GFLOPs: multiply-adds of matrix products and convolutions (attention included), "
          "one multiply-add = one FLOP.")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(rows, indent=2))
    return rows


__all__ = ["count", "run"]
