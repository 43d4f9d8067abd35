"""`transnext attention-map`: where one query pixel looks, in one aggregated-attention block.

The weights are the reference op's own softmax (``return_weights``), kept by the block
during an ordinary forward (``AggregatedAttention.keep_weights``): the w x w window
around the query (fine, foveal) and the pooled tokens (coarse, global). Drawn over the
image: each window weight on its map cell, each pooled token's weight over its whole
pooling cell.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.errors import UserError
from ..models.transnext import AggregatedAttention, TransNeXt
from ..models.symbolic_tables import pool_bins


def _net(model: nn.Module) -> TransNeXt:
    net = next((m for m in model.modules() if isinstance(m, TransNeXt)), None)
    if net is None:
        raise UserError(f"{type(model).__name__} is not a TransNeXt: attention maps are read "
                        f"from TransNeXt's aggregated attention")
    return net


def block_attention(net: TransNeXt, stage: int, block: int) -> AggregatedAttention:
    """The attention module of ``block{stage}.{block}`` (stage from 1, block from 0)."""
    if not 1 <= stage <= net.num_stages:
        raise UserError(f"--stage {stage}: the model has stages 1-{net.num_stages}")
    blocks = getattr(net, f"block{stage}")
    if not 0 <= block < len(blocks):
        raise UserError(f"--block {block}: stage {stage} has blocks 0-{len(blocks) - 1}")
    attn = blocks[block].attn
    if not isinstance(attn, AggregatedAttention):
        raise UserError(f"--stage {stage} uses full attention (every token sees every "
                        f"other), not aggregated attention: choose a stage below {stage}")
    return attn


def query_weights(model: nn.Module, x: torch.Tensor, stage: int, block: int,
                  query_yx: tuple[int, int]) -> dict:
    """Softmax weights of the query at input pixel ``query_yx`` of image ``x`` (1, C, H, W).

    Returns local (h, w, w) and pooled (h, Ph, Pw) weights (per head), the query's map
    cell, the stage map size, its stride in pixels and the pooling bins."""
    net = _net(model)
    attn = block_attention(net, stage, block)
    Y, X = query_yx
    if not (0 <= Y < x.shape[-2] and 0 <= X < x.shape[-1]):
        raise UserError(f"--query {Y} {X} is outside the {x.shape[-2]}x{x.shape[-1]} image")
    attn.keep_weights = True
    try:
        with torch.no_grad():
            net.forward_intermediates(x, indices=[stage - 1], stop_early=True,
                                      intermediates_only=True)
        weights, geo = attn.weights, attn.weights_geometry
    finally:
        attn.keep_weights = False
        for name in ("weights", "weights_geometry"):
            attn.__dict__.pop(name, None)
    H, W = geo.H, geo.W
    qy, qx = min(Y * H // x.shape[-2], H - 1), min(X * W // x.shape[-1], W - 1)
    ww = attn.window_size ** 2
    w = weights[0, qy * W + qx].double().cpu()  # (h, ww + P)
    ph, pw = geo.pool_hw
    return {
        "local": w[:, :ww].reshape(-1, attn.window_size, attn.window_size).numpy(),
        "pooled": w[:, ww:].reshape(-1, ph, pw).numpy(),
        "cell": (qy, qx), "map_hw": (H, W), "stride": 4 * 2 ** (stage - 1),
        "bins": tuple(tuple(t.tolist() for t in pool_bins(n, p, "cpu"))
                      for n, p in ((H, ph), (W, pw))),
    }


def pixel_maps(res: dict, image_hw) -> tuple[np.ndarray, np.ndarray]:
    """(heads, H_img, W_img) maps of the window weights and of the pooled weights, each
    pooled token's weight spread over (every pixel of) its pooling cell."""
    heads, win, _ = res["local"].shape
    H, W = res["map_hw"]
    (hs, he), (ws, we) = res["bins"]
    grid_pool = np.zeros((heads, H, W))
    for a in range(len(hs)):
        for b in range(len(ws)):
            grid_pool[:, hs[a]:he[a], ws[b]:we[b]] = res["pooled"][:, a, b, None, None]
    grid_local = np.zeros((heads, H, W))
    r = win // 2
    qy, qx = res["cell"]
    for i in range(win):
        for j in range(win):
            y, x = qy + i - r, qx + j - r
            if 0 <= y < H and 0 <= x < W:
                grid_local[:, y, x] = res["local"][:, i, j]
    s = res["stride"]

    def up(g):
        return np.repeat(np.repeat(g, s, axis=1), s, axis=2)[:, :image_hw[0], :image_hw[1]]
    return up(grid_local), up(grid_pool)


def plot(image: np.ndarray, res: dict, query_yx, output, heads: str = "mean",
         title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing needs matplotlib (pip install 'transnext-pytorch[viz]')") from None
    local, pooled = pixel_maps(res, image.shape[:2])
    sums_local = res["local"].reshape(len(res["local"]), -1).sum(1)
    sums_pool = res["pooled"].reshape(len(res["pooled"]), -1).sum(1)
    rows = [("mean of heads", local.mean(0), pooled.mean(0), sums_local.mean(), sums_pool.mean())]
    if heads == "all":
        rows = [(f"head {i}", local[i], pooled[i], sums_local[i], sums_pool[i])
                for i in range(len(local))]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 4.4 * len(rows)), squeeze=False)
    Y, X = query_yx
    for (label, lm, pm, sl, sp), (ax_l, ax_p) in zip(rows, axes):
        for ax, m, what, s in ((ax_l, lm, "local window", sl), (ax_p, pm, "pooled tokens", sp)):
            ax.imshow(image)
            shown = np.ma.masked_where(m <= 0, m)
            im = ax.imshow(shown, cmap="inferno", alpha=0.75, vmin=0.0)
            ax.plot([X], [Y], marker="+", color="cyan", markersize=14, mew=2)
            ax.set_title(f"{label}: {what} (weights sum {s:.3f})", fontsize=9)
            ax.set_xlabel("x (input pixels)")
            ax.set_ylabel("y (input pixels)")
            fig.colorbar(im, ax=ax, fraction=0.046).set_label("attention weight")
    fig.suptitle(title or "Aggregated attention of one query")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    from ..data import DataError, load_image
    from ..engine.models import data_config
    from .evaluate import load_for_inference
    import torchvision.transforms.functional as TF

    model, meta = load_for_inference(args.model, args.checkpoint, device="cpu")
    c = meta["in_chans"]
    try:
        img = load_image(args.image, "L" if c == 1 else "RGB")
    except DataError as e:
        raise UserError(str(e)) from None
    Y, X = args.query
    if not (0 <= Y < img.height and 0 <= X < img.width):
        raise UserError(f"--query {Y} {X} is outside {args.image} ({img.height}x{img.width}, "
                        f"rows x columns)")
    scale = args.input_size / min(img.height, img.width)
    size = (max(round(img.height * scale), 1), max(round(img.width * scale), 1))
    img = img.resize((size[1], size[0]))
    dcfg = data_config(model)
    x = TF.normalize(TF.to_tensor(img), meta.get("mean") or dcfg["mean"][:c],
                     meta.get("std") or dcfg["std"][:c]).unsqueeze(0)
    q = (min(int(Y * scale), size[0] - 1), min(int(X * scale), size[1] - 1))
    res = query_weights(model, x, args.stage, args.block, q)
    shown = np.asarray(img.convert("RGB")) / 255.0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    plot(shown, res, q, args.output, args.heads,
         f"{args.model} block{args.stage}.{args.block}, query ({Y}, {X}) -> map cell "
         f"{res['cell']} of {res['map_hw'][0]}x{res['map_hw'][1]}")
    total = res["local"].sum((1, 2)) + res["pooled"].sum((1, 2))
    print(f"wrote {args.output}: {len(total)} heads; local window share "
          + ", ".join(f"{v:.3f}" for v in res["local"].sum((1, 2)))
          + f"; weights sum to {total.min():.6f}-{total.max():.6f} per head")
    return res
