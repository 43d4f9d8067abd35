"""Fashion-MNIST from its standard idx(.gz) files, held in memory as uint8.

Batching and augmentation are tensor operations on whole batches (the fast
path): no per-sample PIL work, which matters on a 2-core CPU.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .names import fashion_mnist_classes

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
MEAN = (0.2860,)
STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Bad or missing input data; the message names the file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one idx file (optionally gzip-compressed); validates magic and size."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"idx file not found: {path}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] < 1:
        raise DataError(f"corrupt idx file {path}: bad magic number {raw[:4].hex() if raw else '(empty)'}")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt idx file {path}: truncated header")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"corrupt idx file {path}: header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}")


def find_root(data_dir: str | None) -> Path:
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory does not exist: {root}")
        return root
    for d in DEFAULT_DIRS:
        if Path(d).is_dir():
            return Path(d)
    raise DataError("Fashion-MNIST not found: pass --data-dir or install Debian's "
                    "dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist)")


def load_fashion_mnist(data_dir: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images uint8 [N,28,28], labels int64 [N]) for split 'train' or 'test'."""
    if split in ("val", "t10k"):
        split = "test"
    root = find_root(data_dir)
    img_stem, lbl_stem, n = _FILES[split]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"corrupt idx file {img_path}: expected uint8 images [N,H,W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"corrupt idx file {lbl_path}: {labels.shape[0] if labels.ndim else 0} labels "
                        f"for {images.shape[0]} images in {img_path}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"corrupt idx file {lbl_path}: labels outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class TensorBatches:
    """An in-memory uint8 image set served in batches, augmented with tensor ops.

    Sharding over distributed ranks: training takes a per-epoch permutation
    (seeded by seed + epoch, identical on every rank), pads it to a multiple of
    the world size like DistributedSampler and takes ``perm[rank::world]``;
    evaluation takes ``range(N)[rank::world]`` with no padding, so the
    uneven last shard never counts a sample twice.
    """

    classes = fashion_mnist_classes()

    def __init__(self, images, labels, batch_size, input_size, *, train, in_chans=1,
                 mean=MEAN, std=STD, seed=0, rank=0, world_size=1, drop_last=None,
                 pad=2, hflip=0.5, device="cpu"):
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.input_size = input_size
        self.train = train
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = train if drop_last is None else drop_last
        self.pad = pad
        self.hflip = hflip
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n)[self.rank::self.world_size]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g)
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator().manual_seed((self.seed + 1) * 100003 + self.epoch * 997 + self.rank)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[sel].unsqueeze(1).float().div_(255.0)
            if self.train:
                x = self._augment(x, g)
            x = self._resize(x)
            if self.in_chans != x.shape[1]:
                x = x.expand(-1, self.in_chans, -1, -1)
            mean, std = self.mean, self.std
            if mean.shape[1] != x.shape[1]:
                mean, std = mean[:, :1], std[:, :1]
            x = (x - mean) / std
            yield x.contiguous().to(self.device, non_blocking=True), self.labels[sel].to(self.device)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g)
            ar_h = torch.arange(h)
            ar_w = torch.arange(w)
            rows = (oy[:, None] + ar_h[None, :])  # b,h
            cols = (ox[:, None] + ar_w[None, :])  # b,w
            bi = torch.arange(b)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(b, generator=g) < self.hflip
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.input_size and x.shape[-2] == self.input_size:
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False, antialias=x.shape[-1] > self.input_size)
