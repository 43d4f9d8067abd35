"""DINO (mmdet 3.0) on TransNeXt: the plain reference of the head (tests/dino_plain.py)
checked piece by piece against hand-written loops and torch's own attention, then the
converter + model (load_dino_state, TransNeXtDINO.head_forward, postprocess) against it on
a random state dict with every key and shape of the released layout, 4- and 5-scale,
in float64, on a padded batch of two differently sized images."""
from __future__ import annotations

import math

import pytest
import torch

import dino_plain as dp
from seg_helpers import TINY_DIMS, read_layout

LAYOUT = "dino_transnext_tiny.keys.txt"


# ----------------------------------------------------------------------------
# released-layout state dicts
# ----------------------------------------------------------------------------

def dino_layout(num_levels: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the head of a released DINO tiny file (no backbone keys): the
    4-scale file's layout, or for 5-scale the one derived from it (a neck conv per stage
    1-4, five levels in level_embed and in every deformable attention)."""
    lay = {k: v for k, v in read_layout(LAYOUT).items() if not k.startswith("backbone.")}
    if num_levels == 4:
        return lay
    assert num_levels == 5
    out = {}
    for k, v in lay.items():
        if k.startswith("neck.convs."):
            continue
        if k == "level_embed":
            v = (5, 256)
        elif k.endswith("sampling_offsets.weight"):
            v = (8 * 5 * 4 * 2, 256)
        elif k.endswith("sampling_offsets.bias"):
            v = (8 * 5 * 4 * 2,)
        elif k.endswith("attention_weights.weight"):
            v = (8 * 5 * 4, 256)
        elif k.endswith("attention_weights.bias"):
            v = (8 * 5 * 4,)
        out[k] = v
    for i, c in enumerate(TINY_DIMS):
        out[f"neck.convs.{i}.conv.weight"] = (256, c, 1, 1)
        out[f"neck.convs.{i}.gn.weight"] = (256,)
        out[f"neck.convs.{i}.gn.bias"] = (256,)
    return out


def random_dino_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded float64 values of sensible scale: unit-variance activations through the
    linears, norms near 1, sampling offsets of a few pixels, class logits around -3."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sd = {}
    for k, shape in sorted(layout.items()):
        if ".norm" in k or ".gn." in k or k.startswith("memory_trans_norm") or ".norms." in k:
            sd[k] = (1.0 + 0.1 * randn(*shape)) if k.endswith("weight") else 0.1 * randn(*shape)
        elif k in ("level_embed", "query_embedding.weight", "dn_query_generator.label_embedding.weight"):
            sd[k] = randn(*shape)
        elif k.endswith("sampling_offsets.bias"):
            sd[k] = 2.0 * randn(*shape)          # a few pixels (or box fractions) away
        elif k.startswith("bbox_head.cls_branches") and k.endswith("bias"):
            sd[k] = -3.0 + 0.5 * randn(*shape)
        elif k.endswith("bias"):
            sd[k] = 0.1 * randn(*shape)
        else:
            fan_in = math.prod(shape[1:])
            sd[k] = randn(*shape) / math.sqrt(fan_in)
    return sd


# 4-scale: the stride 8/16/32 maps of a 200x250 batch (TransNeXt: ceil(S/4), then
# ceil-halved) -> 25x32, 13x16, 7x8 (+ 4x4 extra) = 1080 tokens; 5-scale: a 120x152 batch
# -> 30x38, 15x19, 8x10, 4x5 (+ 2x3) = 1531 tokens; both enough for 900 queries. The second
# image is padded, so its padded tokens (all selected: their constant score is high with
# these weights) put reference boxes at 1 and the eps of both inverse sigmoids matters.
CASES = {
    4: dict(batch=(200, 250), shapes=[(200, 250), (157, 201)],
            maps=[(144, 25, 32), (288, 13, 16), (576, 7, 8)]),
    5: dict(batch=(120, 152), shapes=[(97, 152), (120, 113)],
            maps=[(72, 30, 38), (144, 15, 19), (288, 8, 10), (576, 4, 5)]),
}


def random_feats(num_levels: int, batch: int = 2, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
            for c, h, w in CASES[num_levels]["maps"]]


# ----------------------------------------------------------------------------
# the plain pieces against hand-written loops / torch
# ----------------------------------------------------------------------------

def _bilinear_zero_pad(img, x, y):
    """img (D, H, W) sampled at pixel coordinates (x, y) (centre of pixel j is j), zero outside."""
    D, H, W = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    acc = img.new_zeros(D)
    for xi, yi, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                      (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
        if 0 <= xi < W and 0 <= yi < H:
            acc = acc + w * img[:, yi, xi]
    return acc


def _loop_deformable(sd, name, query, pos, value, pad, ref, shapes, M):
    """mmcv MSDA one output element at a time: identity + output_proj(sum over levels and
    points of softmaxed weight x bilinear sample of that head's value)."""
    B, Q, C = query.shape
    L, D = len(shapes), C // M
    P = sd[f"{name}.sampling_offsets.weight"].shape[0] // (M * L * 2)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    res = torch.zeros(B, Q, C, dtype=query.dtype)
    for b in range(B):
        v = value[b] @ sd[f"{name}.value_proj.weight"].T + sd[f"{name}.value_proj.bias"]
        v[pad[b]] = 0.0
        for q in range(Q):
            qp = query[b, q] + pos[b, q]
            off = sd[f"{name}.sampling_offsets.weight"] @ qp + sd[f"{name}.sampling_offsets.bias"]
            logits = sd[f"{name}.attention_weights.weight"] @ qp + sd[f"{name}.attention_weights.bias"]
            for m in range(M):
                a = torch.softmax(logits[m * L * P:(m + 1) * L * P], 0)
                acc = torch.zeros(D, dtype=query.dtype)
                for lvl, (H, W) in enumerate(shapes):
                    img = v[starts[lvl]:starts[lvl] + H * W, m * D:(m + 1) * D].T.reshape(D, H, W)
                    for p in range(P):
                        o = ((m * L + lvl) * P + p) * 2
                        ox, oy = off[o].item(), off[o + 1].item()
                        r = ref[b, q, lvl]
                        if r.numel() == 2:
                            lx, ly = r[0].item() + ox / W, r[1].item() + oy / H
                        else:
                            lx = r[0].item() + ox / P * r[2].item() * 0.5
                            ly = r[1].item() + oy / P * r[3].item() * 0.5
                        smp = _bilinear_zero_pad(img, lx * W - 0.5, ly * H - 0.5)
                        acc = acc + a[lvl * P + p] * smp
                res[b, q, m * D:(m + 1) * D] = acc
    return query + res @ sd[f"{name}.output_proj.weight"].T + sd[f"{name}.output_proj.bias"]


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_deformable_attention_is_the_bilinear_loop(ref_dim):
    g = torch.Generator().manual_seed(3)
    B, Q, C, M, P = 2, 5, 8, 2, 3
    shapes = [(4, 5), (2, 3), (1, 2)]
    L, S = len(shapes), sum(h * w for h, w in shapes)
    n = "attn"

    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g, dtype=torch.float64)

    sd = {f"{n}.value_proj.weight": r(C, C, scale=0.4), f"{n}.value_proj.bias": r(C),
          f"{n}.sampling_offsets.weight": r(M * L * P * 2, C, scale=0.5),
          f"{n}.sampling_offsets.bias": r(M * L * P * 2, scale=1.5),
          f"{n}.attention_weights.weight": r(M * L * P, C), f"{n}.attention_weights.bias": r(M * L * P),
          f"{n}.output_proj.weight": r(C, C, scale=0.4), f"{n}.output_proj.bias": r(C)}
    query, pos, value = r(B, Q, C), r(B, Q, C), r(B, S, C)
    pad = torch.rand(B, S, generator=g) < 0.2
    if ref_dim == 2:
        ref = torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64)
    else:
        ref = torch.cat([torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64),
                         0.1 + torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64)], -1)
    got = dp.deformable_attention(sd, n, query, pos, value, pad, ref, shapes, num_heads=M)
    want = _loop_deformable(sd, n, query, pos, value, pad, ref, shapes, M)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the padding mask matters, and the query position only enters offsets / weights
    assert not torch.allclose(got, dp.deformable_attention(sd, n, query, pos, value, pad & False,
                                                           ref, shapes, num_heads=M))


def test_self_attention_is_torch_multihead_attention():
    g = torch.Generator().manual_seed(4)
    B, Q, C, M = 2, 7, 16, 4
    mha = torch.nn.MultiheadAttention(C, M, batch_first=True, dtype=torch.float64).eval()
    sd = {f"sa.attn.{k}": v.detach() for k, v in mha.state_dict().items()}
    assert set(sd) == {"sa.attn.in_proj_weight", "sa.attn.in_proj_bias",
                       "sa.attn.out_proj.weight", "sa.attn.out_proj.bias"}
    with torch.no_grad():
        sd["sa.attn.in_proj_bias"].normal_(generator=g)
    query = torch.randn(B, Q, C, generator=g, dtype=torch.float64)
    pos = torch.randn(B, Q, C, generator=g, dtype=torch.float64)
    mask = torch.rand(Q, Q, generator=g) < 0.3
    mask.fill_diagonal_(False)
    for m in (None, mask):
        got = dp.self_attention(sd, "sa", query, pos, m, num_heads=M)
        with torch.no_grad():
            want = query + mha(query + pos, query + pos, query, attn_mask=m, need_weights=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sine_encoding_per_pixel():
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[0, :5, :6] = False
    mask[1, :3, :4] = False
    pe = dp.sine_encoding(mask, torch.float64, temperature=20.0)
    assert pe.shape == (2, 256, 5, 6)
    for b, (vh, vw) in enumerate([(5, 6), (3, 4)]):
        for i in range(5):
            for j in range(6):
                # cumulative count of unpadded pixels above / left, over the column / row total
                col = min(i + 1, vh) if j < vw else 0
                row = min(j + 1, vw) if i < vh else 0
                ny = col / ((vh if j < vw else 0) + 1e-6) * 2 * math.pi
                nx = row / ((vw if i < vh else 0) + 1e-6) * 2 * math.pi
                for c in (0, 1, 6, 77, 127):
                    freq = 20.0 ** (2 * (c // 2) / 128)
                    fn = math.sin if c % 2 == 0 else math.cos
                    assert abs(pe[b, c, i, j].item() - fn(ny / freq)) < 1e-12
                    assert abs(pe[b, 128 + c, i, j].item() - fn(nx / freq)) < 1e-12


def test_coordinate_encoding_order_y_x_w_h():
    box = torch.tensor([[0.1, 0.7, 0.3, 0.05]], dtype=torch.float64)
    enc = dp.coordinate_encoding(box)
    assert enc.shape == (1, 512)
    for block, coord in enumerate((0.7, 0.1, 0.3, 0.05)):  # y, x, w, h
        for c in (0, 1, 50, 127):
            freq = 10000.0 ** (2 * (c // 2) / 128)
            fn = math.sin if c % 2 == 0 else math.cos
            assert abs(enc[0, block * 128 + c].item() - fn(coord * 2 * math.pi / freq)) < 1e-12


def test_proposals_and_reference_points():
    shapes = [(4, 6), (2, 3)]
    masks = dp.padding_masks([(16, 24), (8, 12)], (16, 24), shapes)
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    vr = torch.stack([dp.valid_ratios_of(m, torch.float64) for m in masks], 1)
    torch.testing.assert_close(vr, torch.tensor([[[1.0, 1.0], [1.0, 1.0]],
                                                 [[0.5, 0.5], [2 / 3, 0.5]]], dtype=torch.float64))
    memory = torch.randn(2, 30, 8, dtype=torch.float64)
    out, p = dp.encoder_proposals(memory, flat, shapes)
    # image 0 unpadded: level-0 token (i, j) is the box centred on its pixel, 0.05 wide
    s = p[0].sigmoid()
    for i in range(4):
        for j in range(6):
            want = torch.tensor([(j + 0.5) / 6, (i + 0.5) / 4, 0.05, 0.05], dtype=torch.float64)
            torch.testing.assert_close(s[i * 6 + j], want)
    assert torch.isfinite(p[0]).all() and torch.equal(out[0], memory[0])
    # image 1: padded tokens and tokens whose centre leaves (0.01, 0.99) become inf / zero
    assert torch.isinf(p[1][flat[1]]).all() and (out[1][flat[1]] == 0).all()
    lvl1_valid = p[1, 24:][~flat[1, 24:]]
    assert lvl1_valid.shape[0] == 2  # 2x3 map of which 1x2 is unpadded: centres (0.25 | 0.75, 0.5)
    torch.testing.assert_close(lvl1_valid.sigmoid()[:, :2],
                               torch.tensor([[0.25, 0.5], [0.75, 0.5]], dtype=torch.float64))
    # encoder reference points: pixel centres over the valid size, times each level's ratio
    ref = dp.encoder_reference_points(shapes, vr)
    assert ref.shape == (2, 30, 2, 2)
    torch.testing.assert_close(ref[1, 7, 0], torch.tensor([1.5 / 3, 1.5 / 2], dtype=torch.float64)
                               * vr[1, 0])
    torch.testing.assert_close(ref[1, 7, 1], torch.tensor([1.5 / 3, 1.5 / 2], dtype=torch.float64)
                               * vr[1, 1])


@pytest.fixture(scope="module")
def plain4():
    """The 4-scale plain forward on the padded two-image batch (shared by the tests)."""
    sd = random_dino_state(dino_layout(4), seed=11)
    feats = random_feats(4)
    case = CASES[4]
    with torch.no_grad():
        out = dp.plain_dino_head(sd, feats, case["shapes"], case["batch"], num_levels=4)
    return sd, feats, out


def test_plain_head_shapes_and_batch_independence(plain4):
    sd, feats, out = plain4
    case = CASES[4]
    assert out["cls"].shape == (6, 2, 900, 80) and out["boxes"].shape == (6, 2, 900, 4)
    assert out["enc_cls"].shape == (2, 900, 80) and out["enc_boxes"].shape == (2, 900, 4)
    assert all(torch.isfinite(v).all() for v in out.values())
    # each image alone (same padded batch shape) gives what it gave in the batch
    with torch.no_grad():
        for b in range(2):
            one = dp.plain_dino_head(sd, [f[b:b + 1] for f in feats], case["shapes"][b:b + 1],
                                     case["batch"], num_levels=4)
            for k in out:
                torch.testing.assert_close(one[k][..., 0, :, :] if k in ("cls", "boxes") else one[k][0],
                                           out[k][..., b, :, :] if k in ("cls", "boxes") else out[k][b],
                                           rtol=1e-9, atol=1e-9, msg=k)
    # the padding mask matters: image 1 as if unpadded predicts otherwise
    with torch.no_grad():
        unmasked = dp.plain_dino_head(sd, feats, [case["batch"]] * 2, case["batch"], num_levels=4)
    torch.testing.assert_close(unmasked["cls"][:, 0], out["cls"][:, 0], rtol=1e-9, atol=1e-9)
    assert (unmasked["cls"][:, 1] - out["cls"][:, 1]).abs().max() > 1e-3


def test_plain_predict_by_hand():
    cls = torch.full((6, 1, 3, 2), -10.0, dtype=torch.float64)
    cls[-1, 0, 1, 0], cls[-1, 0, 2, 1], cls[-1, 0, 0, 1] = 2.0, 1.0, 0.5
    boxes = torch.zeros(6, 1, 3, 4, dtype=torch.float64)
    boxes[-1, 0] = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.5, 0.4, 0.2], [0.9, 0.9, 0.4, 0.4]])
    res = dp.plain_dino_predict({"cls": cls, "boxes": boxes}, [(100, 200)], [(2.0, 0.5)], 3)[0]
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)))
    assert res["labels"].tolist() == [0, 1, 1]
    # query 1: x 20 +- 40 -> [0, 60], y 50 +- 10 -> [40, 60]; then / (2, 0.5)
    # query 2: x 180 +- 40 -> [140, 200], y 90 +- 20 -> [70, 100]; query 0: [80, 120] x [40, 60]
    want = torch.tensor([[0.0, 80.0, 30.0, 120.0], [70.0, 140.0, 100.0, 200.0],
                         [40.0, 80.0, 60.0, 120.0]], dtype=torch.float64)
    torch.testing.assert_close(res["boxes"], want)


# ----------------------------------------------------------------------------
# the converter + our model against the plain forward
# ----------------------------------------------------------------------------

def released_state(num_levels: int, seed: int) -> dict[str, torch.Tensor]:
    """A whole released-layout DINO tiny state dict: a seeded TransNeXt tiny backbone under
    ``backbone.`` and the random head above."""
    import transnext
    torch.manual_seed(seed)
    bb = transnext.create_model("transnext_tiny", num_classes=0).state_dict()
    sd = {f"backbone.{k}": v.double() if v.is_floating_point() else v for k, v in bb.items()}
    sd.update(random_dino_state(dino_layout(num_levels), seed))
    return sd


@pytest.mark.parametrize("num_levels", [4, 5])
def test_converted_model_matches_plain_head(num_levels):
    from transnext.tasks.detection.convert_dino import load_dino_state
    from transnext.tasks.detection.dino import build_dino

    sd = released_state(num_levels, seed=20 + num_levels)
    if num_levels == 4:  # exactly the released file's keys and shapes
        assert {k: tuple(v.shape) for k, v in sd.items()} == read_layout(LAYOUT)
    # double before loading: loading keeps the parameters' dtype
    net = build_dino("transnext_tiny", 80, num_levels=num_levels).double().eval()
    load_dino_state(net, sd)
    head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    case = CASES[num_levels]
    feats = random_feats(num_levels, seed=30 + num_levels)
    with torch.no_grad():
        got = net.head_forward(feats, case["shapes"], case["batch"])
        trace = {}
        want = dp.plain_dino_head(head, feats, case["shapes"], case["batch"], num_levels=num_levels,
                                  trace=trace)
    # padded tokens (inf proposals) are among the selected queries of the padded image
    picked = trace["proposals"][1][trace["topk"][1]]
    assert torch.isinf(picked).any(-1).sum() > 100
    assert got.get("dn_meta") is None
    for k in ("enc_cls", "enc_boxes", "cls", "boxes"):
        assert got[k].dtype == torch.float64, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10, msg=k)

    # post-processing: the top 300 per image, boxes back in original-image pixels
    originals = [(round(h / 0.61), round(w / 0.6)) for h, w in case["shapes"]]
    factors = [(w / ow, h / oh) for (h, w), (oh, ow) in zip(case["shapes"], originals)]
    dets = net.postprocess(got, case["shapes"], originals)
    ref = dp.plain_dino_predict(want, case["shapes"], factors, max_per_img=300)
    for d, r in zip(dets, ref):
        assert d["boxes"].shape == (300, 4)
        torch.testing.assert_close(d["scores"].double(), r["scores"], rtol=1e-8, atol=1e-10)
        assert torch.equal(d["labels"], r["labels"] + 1)  # ours count classes from 1
        torch.testing.assert_close(d["boxes"].double(), r["boxes"], rtol=1e-8, atol=1e-8)
