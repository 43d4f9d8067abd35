"""Atomic checkpoint files, RNG state capture, and reading weights for eval/predict."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from ..models import CheckpointError, TransNeXt, apply_checkpoint, read_checkpoint
from .errors import UserError


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C until the block ends. An interrupt inside torch.save surfaces as a
    RuntimeError from the zip writer, not KeyboardInterrupt, so the write is finished
    first and the interrupt raised after it. A handler other than Python's default
    (SIGINT ignored under nohup, or the caller's own) is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace:
    a crash mid-write leaves the previous file intact; Ctrl-C waits for the write."""
    with defer_sigint():
        _save_atomic(obj, Path(path))


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less umask),
        # like the metrics files beside it, so a shared run folder stays readable.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def primitives(obj):
    """Keep only what torch.load(weights_only=True) reads back: str/int/float/bool/None,
    lists and dicts of those."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [primitives(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): primitives(v) for k, v in obj.items()}
    return str(obj)


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": primitives(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def read_file(path: str | os.PathLike) -> dict:
    """Load a .pth/.pt (weights only) or .safetensors file; errors name the file."""
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "model" in obj and "model_name" in obj


def state_dict_of(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def head_classes(sd: dict) -> int | None:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in sd and hasattr(sd[key], "shape"):
            return int(sd[key].shape[0])
    return None


def check_model_name(obj, path, model_name: str) -> None:
    if is_training_checkpoint(obj) and obj["model_name"] != model_name:
        raise UserError(f"checkpoint {path} holds model '{obj['model_name']}', "
                        f"not '{model_name}': pass --model {obj['model_name']}")


def load_weights(model, obj, path, *, use_ema: bool = False) -> None:
    """Load a training checkpoint or a published state dict into ``model`` strictly,
    turning key/shape mismatches into one clear message naming the file."""
    if use_ema and not (is_training_checkpoint(obj) and obj.get("model_ema")):
        raise UserError(f"--use-ema: checkpoint {path} holds no EMA weights (only a run "
                        f"trained with --ema has them)")
    if is_training_checkpoint(obj):
        sd = obj["model_ema"] if use_ema else obj["model"]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(_mismatch(path, e)) from None
        return
    if isinstance(model, TransNeXt):
        try:
            apply_checkpoint(model, obj, f"checkpoint {path}", strict=True)
            return
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(_mismatch(path, e)) from None
    try:
        model.load_state_dict(state_dict_of(obj), strict=True)
    except RuntimeError as e:
        raise UserError(_mismatch(path, e)) from None


def _mismatch(path, e) -> str:
    msg = str(e).strip().splitlines()
    head = " ".join(msg[:3])[:400]
    if str(path) in head:
        return head
    return f"checkpoint {path} does not fit this model (another model or class count?): {head}"
