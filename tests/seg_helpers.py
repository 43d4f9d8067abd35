"""Helpers for the segmentation tests: released-layout state dicts and a plain
re-implementation of mmseg's UPerHead/FCNHead forward (the reference)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

LAYOUTS = Path(__file__).parent / "data" / "released_layouts"
TINY_DIMS = (72, 144, 288, 576)


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (LAYOUTS / name).read_text().splitlines():
        m = re.match(r"^(\S+) \(([\d, ]*)\)$", line.strip())
        if m:
            out[m.group(1)] = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
    return out


def upernet_layout(variant: str = "transnext_tiny") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released UperNet file: the tiny file's layout, with the head's
    input widths moved to the variant's stage widths (SPEC sections 1 and 9) and the
    backbone of that variant (its keys are checked against the tiny layout separately)."""
    import transnext
    tiny = read_layout("upernet_transnext_tiny.keys.txt")
    if variant == "transnext_tiny":
        return tiny
    dims = transnext.ARCHS[variant]["embed_dims"]
    swap = dict(zip(TINY_DIMS, dims))
    swap[TINY_DIMS[3] + 4 * 512] = dims[3] + 4 * 512  # PPM bottleneck input
    head = {k: tuple(swap.get(s, s) if i == 1 else s for i, s in enumerate(v))
            for k, v in tiny.items() if not k.startswith("backbone.")}
    bb = transnext.create_model(variant, num_classes=0).state_dict()
    return {**{f"backbone.{k}": tuple(v.shape) for k, v in bb.items()}, **head}


def random_state(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000, dtype=torch.int64)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".bn.weight") or k.endswith("norm.weight") or re.search(r"norm\d?\.weight$", k):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
            sd[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return sd


def _cbr(x, sd, p, pad):
    x = F.conv2d(x, sd[f"{p}.conv.weight"], None, padding=pad)
    x = F.batch_norm(x, sd[f"{p}.bn.running_mean"], sd[f"{p}.bn.running_var"],
                     sd[f"{p}.bn.weight"], sd[f"{p}.bn.bias"], False, 0.0, 1e-5)
    return F.relu(x)


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def plain_uperhead(feats, sd, pool_scales=(1, 2, 3, 6)):
    """mmseg UPerHead.forward (eval) on mmseg-named weights."""
    top = feats[-1]
    psp = [top] + [_up(_cbr(F.adaptive_avg_pool2d(top, s), sd, f"decode_head.psp_modules.{i}.1", 0),
                       top.shape[2:]) for i, s in enumerate(pool_scales)]
    lat = [_cbr(feats[i], sd, f"decode_head.lateral_convs.{i}", 0) for i in range(len(feats) - 1)]
    lat.append(_cbr(torch.cat(psp, 1), sd, "decode_head.bottleneck", 1))
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[2:])
    outs = [_cbr(lat[i], sd, f"decode_head.fpn_convs.{i}", 1) for i in range(len(lat) - 1)]
    outs.append(lat[-1])
    outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
    x = _cbr(torch.cat(outs, 1), sd, "decode_head.fpn_bottleneck", 1)
    return F.conv2d(x, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def plain_fcnhead(feats, sd, in_index=2):
    x = _cbr(feats[in_index], sd, "auxiliary_head.convs.0", 1)
    return F.conv2d(x, sd["auxiliary_head.conv_seg.weight"], sd["auxiliary_head.conv_seg.bias"])
