"""An independent, deliberately plain implementation of SPEC sections 3-5.

Written from ``shared/SPEC.md`` only: float64, explicit Python loops over
query positions, neighbours and pooled tokens, coordinate tables computed
straight from the SPEC formulas (no unfold, no shifted views, no
deduplication of coordinate pairs, no ``transnext`` imports). Modules are
passed in only as a source of parameters (``named_parameters``).

Slow by design; use small maps.
"""
from __future__ import annotations

import math

import torch

f64 = torch.float64


# ---------------------------------------------------------------------------
# scalar / vector helpers, written out


def params_of(module) -> dict[str, torch.Tensor]:
    """The module's parameters as detached float64 CPU tensors (a dict passes through)."""
    if isinstance(module, dict):
        return module
    return {n: p.detach().to("cpu", f64).clone() for n, p in module.named_parameters()}


def sub(prm: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in prm.items() if k.startswith(prefix)}


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One token (C_in,) -> (C_out,): out[o] = sum_i w[o, i] x[i] + b[o]."""
    out = (w * x[None, :]).sum(dim=1)
    return out + b if b is not None else out


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.sum() / x.numel()
    var = ((x - mu) ** 2).sum() / x.numel()
    return (x - mu) / math.sqrt(float(var) + eps) * w + b


def l2n(x: torch.Tensor) -> torch.Tensor:
    n = math.sqrt(float((x * x).sum()))
    return x / max(n, 1e-12)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def softplus(t: float) -> float:
    return math.log1p(math.exp(t)) if t < 30 else t + math.log1p(math.exp(-t))


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [0.0 if x == -math.inf else math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


# ---------------------------------------------------------------------------
# SPEC section 5: coordinates and the continuous position bias


def pool_bin(i: int, L: int, P: int) -> tuple[int, int]:
    """Bin i of adaptive pooling L -> P: [floor(i L / P), ceil((i+1) L / P))."""
    start = (i * L) // P
    end = -(-((i + 1) * L) // P)
    return start, end


def pooled_centres(L: int, P: int) -> list[float]:
    """adaptive_avg_pool1d(arange(L), P): the mean of each bin's coordinates."""
    out = []
    for i in range(P):
        s, e = pool_bin(i, L, P)
        out.append(sum(range(s, e)) / (e - s))
    return out


def log_spaced(t: float) -> float:
    sign = (t > 0) - (t < 0)
    return sign * math.log2(1.0 + abs(t)) / math.log2(8.0)


def cpb_bias(prm: dict, q_hw, k_hw, pretrain_hw, divisor_floor: int = 1) -> torch.Tensor:
    """bias[head, q, k] of SPEC section 5 for query grid q_hw and key grid k_hw
    (key coordinates: the adaptive-pool bin centres of the query coordinates).

    ``divisor_floor``: S - 1 is replaced by max(S - 1, divisor_floor) so that a
    pretrain grid of one cell is defined (the model documents divisor 1).
    """
    Hq, Wq = q_hw
    Hk, Wk = k_hw
    Sh, Sw = pretrain_hw
    kh_c = pooled_centres(Hq, Hk)
    kw_c = pooled_centres(Wq, Wk)
    dh_div = max(Sh - 1, divisor_floor)
    dw_div = max(Sw - 1, divisor_floor)
    coords = []
    for qy in range(Hq):
        for qx in range(Wq):
            for ky in range(Hk):
                for kx in range(Wk):
                    dh = (qy - kh_c[ky]) / dh_div * 8
                    dw = (qx - kw_c[kx]) / dw_div * 8
                    coords.append((log_spaced(dh), log_spaced(dw)))
    t = torch.tensor(coords, dtype=f64)  # (Nq*Nk, 2), one row per (query, key) pair
    w1, b1 = prm["cpb_fc1.weight"], prm["cpb_fc1.bias"]
    w2, b2 = prm["cpb_fc2.weight"], prm["cpb_fc2.bias"]
    # The MLP on every pair, spelled out: hidden[n, u] = relu(sum_c w1[u, c] t[n, c] + b1[u]).
    hidden = torch.clamp(t[:, 0:1] * w1[None, :, 0] + t[:, 1:2] * w1[None, :, 1] + b1[None], min=0)
    out = (hidden[:, None, :] * w2[None, :, :]).sum(-1) + b2[None]  # (Nq*Nk, h)
    h = out.shape[1]
    return out.t().reshape(h, Hq * Wq, Hk * Wk).contiguous()


def bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) 1-D linear interpolation weights, align_corners=False
    (PyTorch convention: src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0)."""
    M = torch.zeros(n_out, n_in, dtype=f64)
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = int(math.floor(src))
        i0 = min(i0, n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        M[o, i0] += 1.0 - lam
        M[o, i1] += lam
    return M


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by loops: the 2-D (row-major grid) separable weights."""
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], dtype=f64)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = a[i, j] * b
    return out


def resize_bias(bias: torch.Tensor, q0_hw, k0_hw, q_hw, k_hw) -> torch.Tensor:
    """Interpolate mode: (h, Nq0, Nk0) at the reference grids -> (h, Nq, Nk):
    bilinear along the key grid first, then along the query grid.

    out[h, q, k] = sum_{q0, k0} Mq[q, q0] * Mk[k, k0] * bias[h, q0, k0], with
    M = kron(M_rows, M_cols) the separable 2-D bilinear weights.
    """
    Mk = kron(bilinear_weights(k0_hw[0], k_hw[0]), bilinear_weights(k0_hw[1], k_hw[1]))
    Mq = kron(bilinear_weights(q0_hw[0], q_hw[0]), bilinear_weights(q0_hw[1], q_hw[1]))
    mid = torch.einsum("hqs,ks->hqk", bias, Mk)  # key grid
    return torch.einsum("hsk,qs->hqk", mid, Mq)  # then query grid


def position_bias(prm: dict, q_hw, k_hw, pretrain_hw, ref=None) -> torch.Tensor:
    """Extrapolate (ref None): bias at the actual grids. Interpolate: ref =
    (q0_hw, k0_hw) the grids at img_size; built there, then resized."""
    if ref is None:
        return cpb_bias(prm, q_hw, k_hw, pretrain_hw)
    q0, k0 = ref
    return resize_bias(cpb_bias(prm, q0, k0, pretrain_hw), q0, k0, q_hw, k_hw)


# ---------------------------------------------------------------------------
# SPEC section 3: aggregated attention


def aggregated_attention(module, x: torch.Tensor, H: int, W: int, pool_hw, pretrain_hw,
                         ref=None, weights: dict | None = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), float64, SPEC section 3 steps 1-8 with loops.
    ``weights``: filled with {(b, head, p): softmax over the w*w window then the P pooled
    tokens} when given."""
    prm = params_of(module)
    x = x.detach().to("cpu", f64)
    B, N, C = x.shape
    assert N == H * W
    h = prm["temperature"].shape[0]
    d = C // h
    ww = prm["relative_pos_bias_local"].shape[1]
    w = math.isqrt(ww)
    assert w * w == ww
    r = w // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    Ph, Pw = pool_hw
    P = Ph * Pw
    bias = position_bias(prm, (H, W), (Ph, Pw), pretrain_hw, ref)  # (h, N, P)
    temp = [softplus(float(prm["temperature"][i, 0, 0])) for i in range(h)]

    out = torch.zeros(B, N, C, dtype=f64)
    for b in range(B):
        # steps 1-2, per token
        q = [linear(x[b, n], prm["q.weight"], prm.get("q.bias")) for n in range(N)]
        kv = [linear(x[b, n], prm["kv.weight"], prm.get("kv.bias")) for n in range(N)]
        k = [t[:C] for t in kv]
        v = [t[C:] for t in kv]
        # step 5: sr (1x1 conv) -> gelu -> adaptive avg pool -> norm -> kv
        srw = prm["sr.weight"][:, :, 0, 0]
        act = [gelu(linear(x[b, n], srw, prm["sr.bias"])) for n in range(N)]
        pooled = []
        for py in range(Ph):
            y0, y1 = pool_bin(py, H, Ph)
            for px in range(Pw):
                x0, x1 = pool_bin(px, W, Pw)
                acc = torch.zeros(C, dtype=f64)
                for yy in range(y0, y1):
                    for xx in range(x0, x1):
                        acc = acc + act[yy * W + xx]
                acc = acc / ((y1 - y0) * (x1 - x0))
                pooled.append(layer_norm(acc, prm["norm.weight"], prm["norm.bias"], 1e-5))
        kvp = [linear(t, prm["kv.weight"], prm.get("kv.bias")) for t in pooled]
        kp = [t[:C] for t in kvp]
        vp = [t[C:] for t in kvp]

        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            qe = prm["query_embedding"][head, 0]
            lt = prm["learnable_tokens"][head]  # (d, ww)
            lb = prm["learnable_bias"][head, 0]  # (ww,)
            rb = prm["relative_pos_bias_local"][head]  # (ww,)
            kp_hat = [l2n(t[sl]) for t in kp]
            for y in range(H):
                for xx in range(W):
                    p = y * W + xx
                    q_hat = l2n(q[p][sl])
                    inside = []
                    for dy, dx in offsets:
                        yy, xq = y + dy, xx + dx
                        inside.append(0 <= yy < H and 0 <= xq < W)
                    n_p = sum(inside)
                    s_p = math.log(n_p + P)
                    q_tilde = (q_hat + qe) * temp[head] * s_p
                    logits = []
                    for j, (dy, dx) in enumerate(offsets):
                        if inside[j]:
                            kn = l2n(k[(y + dy) * W + (xx + dx)][sl])
                            logits.append(dot(q_tilde, kn) + float(rb[j]))
                        else:
                            logits.append(-math.inf)
                    for t in range(P):
                        logits.append(dot(q_tilde, kp_hat[t]) + float(bias[head, p, t]))
                    A = softmax(logits)
                    if weights is not None:
                        weights[(b, head, p)] = A
                    o = torch.zeros(d, dtype=f64)
                    for j, (dy, dx) in enumerate(offsets):
                        m = A[j] + dot(q_hat, lt[:, j]) + float(lb[j])
                        if inside[j]:
                            o = o + m * v[(y + dy) * W + (xx + dx)][sl]
                    for t in range(P):
                        o = o + A[ww + t] * vp[t][sl]
                    out[b, p, sl] = o
        for n in range(N):
            out[b, n] = linear(out[b, n].clone(), prm["proj.weight"], prm["proj.bias"])
    return out


# ---------------------------------------------------------------------------
# SPEC section 4: full attention


def full_attention(module, x: torch.Tensor, H: int, W: int, pretrain_hw, ref=None) -> torch.Tensor:
    prm = params_of(module)
    x = x.detach().to("cpu", f64)
    B, N, C = x.shape
    assert N == H * W
    h = prm["temperature"].shape[0]
    d = C // h
    bias = position_bias(prm, (H, W), (H, W), pretrain_hw, ref)  # (h, N, N)
    temp = [softplus(float(prm["temperature"][i, 0, 0])) for i in range(h)]
    scale = math.log(N)
    out = torch.zeros(B, N, C, dtype=f64)
    for b in range(B):
        qkv = [linear(x[b, n], prm["qkv.weight"], prm.get("qkv.bias")) for n in range(N)]
        for head in range(h):
            # (3*h, d) split: q heads, then k heads, then v heads
            qs = [t[head * d:(head + 1) * d] for t in qkv]
            ks = [t[C + head * d:C + (head + 1) * d] for t in qkv]
            vs = [t[2 * C + head * d:2 * C + (head + 1) * d] for t in qkv]
            qe = prm["query_embedding"][head, 0]
            k_hat = [l2n(t) for t in ks]
            for p in range(N):
                q_s = (l2n(qs[p]) + qe) * temp[head] * scale
                logits = [dot(q_s, k_hat[t]) + float(bias[head, p, t]) for t in range(N)]
                A = softmax(logits)
                o = torch.zeros(d, dtype=f64)
                for t in range(N):
                    o = o + A[t] * vs[t]
                out[b, p, head * d:(head + 1) * d] = o
        for n in range(N):
            out[b, n] = linear(out[b, n].clone(), prm["proj.weight"], prm["proj.bias"])
    return out


# ---------------------------------------------------------------------------
# SPEC section 2 arithmetic


def stage_sizes(H: int, W: int, stages: int = 4) -> list[tuple[int, int]]:
    """ceil(S / 4), then ceil-halved per stage."""
    out = []
    h, w = math.ceil(H / 4), math.ceil(W / 4)
    for i in range(stages):
        if i:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((h, w))
    return out


# ---------------------------------------------------------------------------
# SPEC sections 2 and 6 around the attention: the whole model, plainly


def tokens_layer_norm(t: torch.Tensor, w, b, eps) -> torch.Tensor:
    """(B, N, C): layer_norm of every token."""
    out = torch.empty_like(t)
    for bi in range(t.shape[0]):
        for n in range(t.shape[1]):
            out[bi, n] = layer_norm(t[bi, n], w, b, eps)
    return out


def conv_glu(prm: dict, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """SPEC section 6: fc1 -> (g, v) halves; fc2(gelu(dwconv3x3(g)) * v)."""
    B, N, C = t.shape
    hidden = prm["fc2.weight"].shape[1]
    dw_w, dw_b = prm["dwconv.dwconv.weight"], prm["dwconv.dwconv.bias"]
    out = torch.zeros(B, N, C, dtype=f64)
    for bi in range(B):
        h1 = [linear(t[bi, n], prm["fc1.weight"], prm["fc1.bias"]) for n in range(N)]
        g = [v[:hidden] for v in h1]
        val = [v[hidden:] for v in h1]
        for y in range(H):
            for x in range(W):
                acc = dw_b.clone()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < H and 0 <= xx < W:
                            acc = acc + dw_w[:, 0, dy + 1, dx + 1] * g[yy * W + xx]
                n = y * W + x
                out[bi, n] = linear(gelu(acc) * val[n], prm["fc2.weight"], prm["fc2.bias"])
    return out


def model_forward(model, img: torch.Tensor, sr_ratios, pretrain_size: int = 224):
    """The whole network (SPEC section 2) in float64; returns (stage maps NCHW, logits).

    The stem convolutions use torch's conv2d (plain convolution, not under test
    here); every LayerNorm, block, attention and the head are written out.
    """
    prm = params_of(model)
    x = img.detach().to("cpu", f64)
    feats = []
    for i in range(4):
        pe = sub(prm, f"patch_embed{i + 1}.")
        k = pe["proj.weight"].shape[-1]
        x = torch.nn.functional.conv2d(x, pe["proj.weight"], pe["proj.bias"],
                                       stride=4 if i == 0 else 2, padding=k // 2)
        B, C, H, W = x.shape
        t = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        t = tokens_layer_norm(t, pe["norm.weight"], pe["norm.bias"], 1e-5)
        stride = 4 * 2**i
        pre = (pretrain_size // stride,) * 2
        sr = sr_ratios[i]
        j = 0
        while f"block{i + 1}.{j}.norm1.weight" in prm:
            bp = sub(prm, f"block{i + 1}.{j}.")
            y = tokens_layer_norm(t, bp["norm1.weight"], bp["norm1.bias"], 1e-6)
            ap = sub(bp, "attn.")
            if sr > 1:
                pool = (max(H // sr, 1), max(W // sr, 1))
                t = t + aggregated_attention(ap, y, H, W, pool, pre)
            else:
                t = t + full_attention(ap, y, H, W, pre)
            y = tokens_layer_norm(t, bp["norm2.weight"], bp["norm2.bias"], 1e-6)
            t = t + conv_glu(sub(bp, "mlp."), y, H, W)
            j += 1
        t = tokens_layer_norm(t, prm[f"norm{i + 1}.weight"], prm[f"norm{i + 1}.bias"], 1e-6)
        x = t.reshape(B, H, W, C).permute(0, 3, 1, 2)
        feats.append(x)
    pooled = x.mean(dim=(2, 3))
    logits = torch.stack([linear(pooled[b], prm["head.weight"], prm["head.bias"])
                          for b in range(pooled.shape[0])])
    return feats, logits
