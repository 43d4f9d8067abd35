"""Update and checkpoint steps shared by the iteration-based dense trainers (seg, det)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from ...engine import checkpointing as ckpt
from ...engine.distributed import all_gather_object, barrier


def save_last_and_best(out: Path, make_state, is_best: bool, main: bool) -> None:
    """Gather every rank's RNG state (exact resume restores each rank's own), then rank 0
    writes ``last.pth`` (and ``best.pth``) atomically from ``make_state(rng_all)``; every
    rank waits for the files."""
    rng_all = all_gather_object(ckpt.rng_state())
    if main:
        state = make_state(rng_all)
        ckpt.save_atomic(state, out / "last.pth")
        if is_best:
            ckpt.save_atomic(state, out / "best.pth")
    barrier()


@contextmanager
def closing_loop(out: Path, main: bool, bar, mlog, iteration):
    """Around a trainer's loop: on Ctrl-C, where the run stands (``iteration()``) and how to
    go on; the progress bar (or None) and the metric log are closed either way."""
    try:
        yield
    except KeyboardInterrupt:
        if main:
            last = out / "last.pth"
            print(f"\ninterrupted at iteration {iteration()}; " + (
                f"resume with --resume {last}" if last.exists() else "no checkpoint yet"),
                file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        mlog.close()


def backward_and_step(loss, model, optimizer, scaler, clip_grad: float | None,
                      sync=None) -> None:
    """One update: backward (scaled when fp16's GradScaler is on), ``sync()`` (gradients
    averaged over ranks without DDP: ``engine.distributed.GradientAverager``), gradient-norm
    clipping on the unscaled gradients, the optimizer step, gradients cleared."""
    from torch import nn
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if sync is not None:
        sync()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
