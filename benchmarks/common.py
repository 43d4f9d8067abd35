"""Timing and table helpers shared by the dense-task benchmarks."""
from __future__ import annotations

import statistics
import time

import torch


def timed(step, iters: int, repeats: int, device: str) -> float:
    """Median over ``repeats`` windows of ``iters`` calls of ``step``, seconds per call
    (CUDA events on the GPU, the wall clock elsewhere)."""
    out = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                step()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1000 / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                step()
            out.append((time.perf_counter() - t) / iters)
    return statistics.median(out)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table: cols are (key, header, format spec); missing values print '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
