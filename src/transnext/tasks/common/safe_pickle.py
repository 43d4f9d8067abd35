"""Read the tensors of a torch zip checkpoint whose other entries hold objects
that ``torch.load(weights_only=True)`` refuses (e.g. mmengine's ``message_hub``
or numpy scalars in ``meta``), without running any pickled code.

The unpickler resolves only the handful of tensor-rebuilding globals and plain
containers; every other global becomes an inert ``Opaque`` placeholder that
records its name and ignores its arguments. Nothing is imported by name from
the file, and no callable of the file's choosing is ever called.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import torch

_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class Opaque:
    """Stands for an object of a class the reader does not trust."""

    def __init__(self, name: str, *args, **kwargs):
        self.name = name

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<opaque {self.name}>"


def _opaque_factory(name: str):
    def make(*args, **kwargs):
        return Opaque(name)
    make.__new__ = lambda *a, **k: Opaque(name)  # NEWOBJ path
    return make


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *rest):
    t = torch.empty(0, dtype=storage.dtype)
    return t.set_(storage.untyped_storage(), offset, tuple(size), tuple(stride)) \
        if hasattr(storage, "untyped_storage") else t.set_(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix = zf, prefix
        self.loaded: dict = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return _rebuild_tensor
        if full == "torch._utils._rebuild_parameter":
            return _rebuild_parameter
        if full == "collections.OrderedDict":
            return _ordered_dict
        if module == "torch" and name in _DTYPES:
            return _StorageType(_DTYPES[name])
        return _opaque_factory(full)

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage record {kind!r}")
        if key not in self.loaded:
            raw = bytearray(self.zf.read(f"{self.prefix}data/{key}"))
            dtype = storage_type.dtype
            t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            t = t.view(dtype) if raw else torch.empty(0, dtype=dtype)
            self.loaded[key] = _Typed(t)
        return self.loaded[key]


class _Typed:
    """A storage with its dtype (what _rebuild_tensor needs)."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.dtype = t.dtype

    def untyped_storage(self):
        return self.t.untyped_storage()


def load_tensors_only(path) -> dict:
    """The checkpoint's pickled object with tensors rebuilt and every untrusted
    object replaced by an ``Opaque`` placeholder. Raises ValueError when the file
    is not a torch zip checkpoint."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a torch zip checkpoint: {e}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise ValueError("no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and zf.read(order).strip() not in (b"little", b""):
            raise ValueError("big-endian checkpoint")
        return _Unpickler(zf.read(pkl[0]), zf, prefix).load()
