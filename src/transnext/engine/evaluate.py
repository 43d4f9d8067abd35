"""Distributed evaluation: top-1 / top-5 / loss summed over ranks."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum


def autocast(device: torch.device, amp: str):
    if amp in (None, "none"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, device, *, amp: str = "none", subset: list[int] | None = None,
             progress: bool = False, desc: str = "eval") -> dict:
    """Accuracy of ``model`` on ``loader`` (each rank its own shard; sums are
    all-reduced, so with a ShardSampler each sample counts exactly once).

    ``subset``: output indices the labels live in (ImageNet-A/-R): logits are
    restricted to them before arg-max, loss and top-k; labels are full output
    indices and must belong to the subset.
    """
    model.eval()
    sub = torch.tensor(subset, device=device) if subset is not None else None
    pos = None
    if subset is not None:
        pos = torch.full((max(subset) + 1,), -1, dtype=torch.long, device=device)
        pos[sub] = torch.arange(len(subset), device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for x, y in it:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        if sub is not None:
            logits = logits[:, sub]
            y = pos[y]
        loss = F.cross_entropy(logits, y, reduction="sum")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             loss.double(), torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}
