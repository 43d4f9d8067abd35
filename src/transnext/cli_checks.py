"""Checks for command-line values, shared by every ``transnext`` subcommand.

Two kinds:

* argparse ``type=`` helpers (``positive_int``, ``probability``, ``existing_file``,
  ...) check one value as it is parsed; argparse prefixes the flag, so the user
  reads ``transnext train: error: argument --input-size: must be an integer of 1
  or more, got '0'``.
* :class:`UsageError` for combinations of flags, raised by a subcommand's check
  function (``parser.set_defaults(check=fn)``), which ``cli.main`` runs after
  parsing and before any work or any file is written.

``cli.main`` prints every error the package raises on purpose (``UsageError``,
``UserError``, ``DataError``, ``CheckpointError``, a ``ValueError`` raised by the
package's own code) as one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from .engine.errors import UserError

__all__ = [
    "UsageError", "positive_int", "non_negative_int", "positive_float", "non_negative_float",
    "probability", "below_one", "int_at_least", "existing_file", "existing_dir", "output_file",
    "device_name", "threads_value", "model_name", "arch_name", "writable_dir", "flag",
]


class UsageError(UserError):
    """A flag value or a combination of flags that cannot work; found before any work."""


def flag(name: str) -> str:
    """'input_size' -> '--input-size' (argparse dest to the flag the user typed)."""
    return "--" + name.replace("_", "-")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def int_at_least(low: int):
    """argparse type: an integer >= ``low``."""
    def check(text: str) -> int:
        v = _int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer of {low} or more, got {text!r}")
        return v
    check.__name__ = f"int_at_least_{low}"
    return check


positive_int = int_at_least(1)
positive_int.__name__ = "positive_int"
non_negative_int = int_at_least(0)
non_negative_int.__name__ = "non_negative_int"


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text!r}")
    return v


def probability(text: str) -> float:
    """A number in [0, 1]."""
    v = _float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return v


def below_one(text: str) -> float:
    """A number in [0, 1): rates where 1 would drop or smooth away everything."""
    v = _float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text!r}")
    return v


def existing_file(text: str) -> str:
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"file not readable (permissions): {text}")
    return text


def existing_dir(text: str) -> str:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    return text


def writable_dir(path: str | os.PathLike) -> str | None:
    """Why a folder cannot be created or written (None when it can); creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a folder"
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        return f"{q} is a file, so {p} cannot be created"
    if not os.access(q, os.W_OK | os.X_OK):
        return f"{q} is not writable"
    return None


def output_file(text: str) -> str:
    """A file to write: not a folder, and its folder can be created or written."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    why = writable_dir(p.parent if str(p.parent) else ".")
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {why}")
    return text


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def device_name(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(
            f"must be cpu, cuda or cuda:N (or auto), got {text!r}")
    return text


def threads_value(text: str) -> str:
    """'auto' or a positive integer (kept as text; the jobs read both)."""
    if text == "auto":
        return text
    return str(positive_int(text))


def model_name(text: str) -> str:
    """Any model timm knows (the TransNeXt names are registered on import)."""
    import timm

    from . import models  # noqa: F401  (registers the TransNeXt names)
    if timm.is_model(text):
        return text
    stem = text.split("_")[0]
    close = [n for n in timm.list_models(f"*{stem}*")][:8] if stem else []
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}" + (f"; similar: {', '.join(close)}" if close else
                                     "; `timm.list_models()` lists the known names"))


def arch_name(text: str) -> str:
    """One of the TransNeXt variants."""
    from .models.archs import ARCHS
    if text not in ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose from {', '.join(ARCHS)}")
    return text


def add_compile_flags(a) -> None:
    """--compile [model|blocks], --compile-mode and --cuda-graphs (``a``: a parser's
    add_argument)."""
    a("--compile", nargs="?", const="model", default=None, choices=["model", "blocks"],
      help="torch.compile with static shapes: the whole model (default), or each TransNeXt "
           "block alone ('blocks': alike blocks share one compile, so the first compile is "
           "shorter; with --compile-mode reduce-overhead the fastest measured training at "
           "detection sizes on the GPU)")
    a("--compile-mode", default=None,
      choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
      help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs of "
           "Inductor's fused code (at 800x1333 15%% faster per step than --cuda-graphs, "
           "after minutes of compiling; README, Performance)")
    a("--cuda-graphs", action="store_true",
      help="record the eager training step's forward and backward in CUDA graphs at the first "
           "batch and replay them (no torch.compile; one GPU, or torchrun, which then averages "
           "the gradients after the graphed backward instead of using DDP; other batch shapes "
           "run eagerly): 1.5-2.3x faster than eager TransNeXt steps, a second to record "
           "(README, Performance)")
