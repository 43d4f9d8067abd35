"""Schedule pieces the dense-task training jobs share: mmcv's linear warm-up and the
wall-clock time budget (the CPU demos)."""
from __future__ import annotations

import time

import torch


def warmup_factor(it: int, warmup: int, warmup_ratio: float) -> float:
    """mmcv's linear warm-up: ``warmup_ratio`` at iteration 0 rising to 1 at ``warmup``."""
    if it >= warmup:
        return 1.0
    return 1.0 - (1.0 - it / warmup) * (1.0 - warmup_ratio)


class TimeBudget:
    """--time-budget: the schedule follows the wall clock. Progress is the larger of
    iterations / total iterations and training time / (budget - a reserve for the
    final evaluation); the learning-rate schedule reads it, and training ends when it
    reaches 1. A machine that slows down or speeds up mid-run changes the iteration
    count, not the length. Rank 0's clock decides for every rank.

    ``reserve``: seconds kept for the final evaluation (default: 3% of the budget, at
    least 10 s). ``elapsed``: training time already spent (a resumed run)."""

    def __init__(self, seconds: float, elapsed: float = 0.0, reserve: float | None = None):
        reserve = max(10.0, 0.03 * seconds) if reserve is None else reserve
        self.train_s = max(seconds - reserve, 1.0)
        self.t0 = time.time() - elapsed

    def elapsed(self) -> float:
        return time.time() - self.t0

    def expected_iters(self, it: int, iters: int) -> int:
        """How many iterations the run will likely reach: the pace so far over the whole
        budget, at most ``iters`` (the progress bar's total, so that its time estimate is the
        budget's and not that of ``iters`` iterations)."""
        frac = self.elapsed() / self.train_s
        if it <= 0 or frac <= 0:
            return iters
        return max(it, min(iters, round(it / frac)))

    def last_iteration(self, it: int, iters: int, device, bar=None) -> bool:
        """After iteration ``it`` of at most ``iters``: True when the budget is spent (``it``
        was then the last iteration, and ``bar``'s total becomes ``it``); else ``bar``'s total
        follows the expected count (every 10 iterations)."""
        if it < iters and self.progress(it, iters, device) >= 1.0:
            if bar is not None:
                bar.total = it
            return True
        if bar is not None and it % 10 == 0:
            bar.total = self.expected_iters(it, iters)
        return False

    def progress(self, it: int, iters: int, device) -> float:
        p = torch.tensor([max(it / iters, self.elapsed() / self.train_s)], dtype=torch.float64,
                         device=device)
        import torch.distributed as tdist
        if tdist.is_available() and tdist.is_initialized():
            tdist.broadcast(p, src=0)
        return float(p)
