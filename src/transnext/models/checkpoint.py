"""Weights in and out: the one place that maps checkpoint layouts to the model.

Understands the released classification checkpoints (a plain state dict or one
under ``model``), the released detection/segmentation checkpoints (under
``state_dict`` with a ``backbone.`` prefix beside the heads' keys), our own
training checkpoints (under ``model``), DDP/compile prefixes, and
``.safetensors``. Files are read with ``weights_only=True``: no code in a data
file is ever executed.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .archs import ARCHS

# Derived tables some exports carry; they are rebuilt per size here.
_DERIVED_BUFFERS = {"relative_pos_index", "relative_coords_table", "seq_length_scale",
                    "padding_mask"}
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_STAGE_KEY = re.compile(r"^(?:patch_embed|block|norm)(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model, with the reason."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file into a dict, safely (``weights_only=True``).

    Refusals say what was found: no such file, not a checkpoint file, truncated or
    damaged, or a pickle that asks for code (naming the global it wanted)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    size = path.stat().st_size
    kind = _file_kind(head, size)
    if kind == "empty":
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    if kind == "safetensors" or path.suffix == ".safetensors":
        return _read_safetensors(path, head)
    if kind is None:
        raise CheckpointError(
            f"{path} is not a checkpoint file: neither a PyTorch .pth/.pt (zip or pickle) nor "
            f".safetensors (it starts with {head[:8]!r})")
    if kind == "zip":
        _check_zip(path)
    try:
        with warnings.catch_warnings():  # protocol-4 notes; the refusal below says more
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        wanted = _first_unsafe_global(path, kind)
        if wanted:
            raise CheckpointError(
                f"refusing to load {path}: its pickle asks for {wanted!r}, which would run "
                f"code outside torch (nothing was run); only tensors and plain containers are "
                f"read. Save the weights alone (torch.save(model.state_dict(), ...)) or as "
                f".safetensors") from None
        if _pickle_protocol(path, kind) >= 4:
            raise CheckpointError(
                f"{path} was saved with pickle protocol 4 or 5, which torch's safe "
                f"(weights-only) reader does not read; re-save it with torch.save's default "
                f"protocol or as .safetensors") from None
        raise CheckpointError(f"{path} is damaged or not a checkpoint: its pickle cannot be "
                              f"read") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError) as e:
        raise CheckpointError(f"{path} is truncated or damaged: {_short(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _file_kind(head: bytes, size: int) -> str | None:
    """'zip' (torch.save's format), 'pickle' (the legacy format), 'safetensors', 'empty'."""
    if size == 0:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5:
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    return None


def _read_safetensors(path: Path, head: bytes) -> dict:
    if head[8:9] != b"{":
        raise CheckpointError(f"{path} is not a safetensors file (no safetensors header)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is a truncated or damaged safetensors file: "
                              f"{_short(e)}") from None


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path} is truncated or damaged: its zip index is missing "
                              f"(the file ends early?)") from None
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint "
                              f"(no data.pkl in it)")


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0][:160] if lines else type(e).__name__)


def _pickle_bytes(path: Path, kind: str) -> bytes | None:
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                return z.read(name)
        return path.read_bytes()
    except (OSError, zipfile.BadZipFile, StopIteration):
        return None


def _pickle_protocol(path: Path, kind: str) -> int:
    data = _pickle_bytes(path, kind) or b""
    return data[1] if data[:1] == b"\x80" and len(data) > 1 else 0


def _first_unsafe_global(path: Path, kind: str) -> str | None:
    """The first global a pickle names that a weights-only load does not allow, found by
    reading its opcodes (nothing is imported or run)."""
    data = _pickle_bytes(path, kind)
    if data is None:
        return None
    allowed = _allowed_globals()
    f = io.BytesIO(data)
    while f.tell() < len(data):  # the legacy format is several pickles in a row
        for g in _globals_in(f):
            if g not in allowed and not g.startswith("torch."):
                return g
        if kind == "zip":
            break
    return None


def _globals_in(f) -> list[str]:
    found, strings, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(f):
            if op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
                strings.append(arg)
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - garbage after the pickle ends the scan
        f.seek(0, io.SEEK_END)
    return found


def _allowed_globals() -> set[str]:
    names = set()
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        names |= set(_get_allowed_globals())
    except (ImportError, AttributeError):
        pass
    for g in getattr(torch.serialization, "get_safe_globals", lambda: [])():
        g = g[0] if isinstance(g, tuple) else g
        names.add(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', g)}")
    return names | {"collections.OrderedDict", "builtins.set", "builtins.frozenset",
                    "builtins.bytearray", "_codecs.encode"}


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict, whichever wrapper key holds them, with
    DDP/compile prefixes removed and only the backbone of a dense-task model."""
    sd = obj
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), dict) and sd[key]:
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        # Detection/segmentation checkpoint: keep the backbone, leave the heads.
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}


def describe(sd_or_model) -> dict:
    """Architecture signature: per stage (dim, depth, heads, attention kind)."""
    if isinstance(sd_or_model, nn.Module):
        m = sd_or_model
        return {
            "stages": [
                (m.embed_dims[i], m.depths[i], m.num_heads[i],
                 "aggregated" if m.sr_ratios[i] > 1 else "full")
                for i in range(m.num_stages)
            ]
        }
    sd = sd_or_model
    stages = []
    i = 1
    while f"patch_embed{i}.proj.weight" in sd:
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"block{i}.")}
        temp = sd.get(f"block{i}.0.attn.temperature")
        kind = "aggregated" if f"block{i}.0.attn.q.weight" in sd else "full"
        stages.append((sd[f"patch_embed{i}.proj.weight"].shape[0], len(blocks),
                       int(temp.shape[0]) if temp is not None else None, kind))
        i += 1
    return {"stages": stages}


def variant_name(signature: dict) -> str:
    """Name of the known variant with this signature, else the signature itself."""
    stages = signature["stages"]
    for name, a in ARCHS.items():
        ref = [(a["embed_dims"][i], a["depths"][i], a["num_heads"][i],
                "aggregated" if a["sr_ratios"][i] > 1 else "full") for i in range(4)]
        if stages == ref:
            return name
        if stages and stages == ref[: len(stages)]:
            return f"{name} (first {len(stages)} stages)"
    dims = [s[0] for s in stages]
    depths = [s[1] for s in stages]
    kinds = "".join("A" if s[3] == "aggregated" else "F" for s in stages)
    return f"an unknown variant (dims={dims}, depths={depths}, attention={kinds})"


def _check_variant(sd: dict, model: nn.Module, source: str) -> None:
    want = describe(model)["stages"]
    have = describe(sd)["stages"]
    if have[: len(want)] != want:
        raise CheckpointError(
            f"{source} holds weights of {variant_name({'stages': have})}, but the model is "
            f"{variant_name(describe(model))}; create the model that matches the checkpoint")


# Key under which read_pretrained_file leaves the file name for checkpoint_filter_fn,
# which timm calls with the weights only.
_SOURCE_KEY = "__transnext_source__"


def read_pretrained_file(cfg: dict | None) -> dict | None:
    """timm's ``pretrained_cfg(_overlay)`` with ``file``: the file read here (so its
    refusals are this module's), handed to timm as ``state_dict``."""
    if not cfg or not cfg.get("file") or cfg.get("state_dict") is not None:
        return cfg
    obj = dict(read_checkpoint(cfg["file"]))
    obj[_SOURCE_KEY] = f"checkpoint {cfg['file']}"
    return {**cfg, "file": None, "state_dict": obj}


def checkpoint_filter_fn(state_dict: dict, model: nn.Module,
                         source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: any supported layout -> this model's keys.

    The head and the input conv are left for timm to adapt (class count and
    ``in_chans`` changes); the variant is checked here.
    """
    source = state_dict.get(_SOURCE_KEY, source)
    sd = unwrap_state_dict(state_dict)
    _check_variant(sd, model, source)
    keep = []
    for k, v in sd.items():
        m = _STAGE_KEY.match(k)
        if m and int(m.group(1)) > model.num_stages:
            continue  # stage pruned away (features_only with fewer out_indices)
        if k.startswith("head.") and not isinstance(model.head, nn.Linear):
            continue  # backbone without a classifier
        keep.append((k, v))
    return dict(keep)


def summarise(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` keys, then how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatch(missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    """'missing N key(s): ...; unexpected M key(s): ...', the parts that apply."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {summarise(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {summarise(unexpected, limit)}")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    drop_head: bool = False) -> dict:
    """Load a published or own checkpoint into a TransNeXt model (or its
    ``features_only`` wrapper). Strict about the backbone: every backbone key
    must be present and every key must be known. ``drop_head`` skips the
    classifier (fine-tuning into another class count).

    Returns the checkpoint dict (for metadata such as class names).
    """
    obj = read_checkpoint(path)
    apply_checkpoint(model, obj, f"checkpoint {path}", strict=strict, drop_head=drop_head)
    return obj


def apply_checkpoint(model: nn.Module, obj: dict, source: str = "checkpoint",
                     strict: bool = True, drop_head: bool = False) -> None:
    """:func:`load_checkpoint` on a checkpoint dict already read; ``source`` names
    it in error messages."""
    net = getattr(model, "model", model)  # timm's FeatureGetterNet wraps the model
    sd = checkpoint_filter_fn(obj, net, source)
    if drop_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = net.state_dict()
    missing = [k for k in own if k not in sd and not (drop_head and k.startswith("head."))]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source} does not fit the model: "
                              + key_mismatch(missing, unexpected))
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        hint = ""
        if any(b.startswith("head.") for b in bad):
            hint = " (a different class count: pass drop_head=True to fine-tune)"
        elif any(b.startswith("patch_embed1.proj.weight") for b in bad):
            hint = " (a different number of input channels)"
        raise CheckpointError(f"{source} has tensors of the wrong shape{hint}: "
                              f"{summarise(bad, 4)}")
    net.load_state_dict(sd, strict=strict and not drop_head)
