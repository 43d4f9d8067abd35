"""Webdataset-style tar shards read as a map-style dataset.

Layout: ``DIR/<split>/*.tar``; inside each tar, samples are files sharing a key:
``<key>.jpg|jpeg|png|webp`` (the image) and ``<key>.cls`` (the class index as text).
Optional ``DIR/classes.txt`` names the classes, one a line.

The shards are indexed once (tar headers only: member offsets and sizes), then any
sample is read by a seek, so the usual samplers (DistributedSampler, repeated
augmentation), exact resume and uneven-shard handling work unchanged. An image that
does not decode is skipped when loaded (a warning names shard and member; the next
sample is served in its place).
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from .fashion_mnist import DataError

log = logging.getLogger("transnext.data")
IMG_EXT = (".jpg", ".jpeg", ".png", ".webp")


def read_class_names(root: Path) -> list[str] | None:
    f = root / "classes.txt"
    if f.is_file():
        return [x.strip() for x in f.read_text().splitlines() if x.strip()]
    return None


class TarShards:
    def __init__(self, split_dir: str | os.PathLike, transform: Callable | None = None,
                 mode: str = "RGB"):
        self.root = Path(split_dir)
        if not self.root.is_dir():
            raise DataError(f"data directory does not exist: {self.root}")
        self.shards = sorted(self.root.glob("*.tar"))
        if not self.shards:
            raise DataError(f"no .tar shards in {self.root}")
        self.transform, self.mode = transform, mode
        self.samples: list[tuple[int, int, int, int, str]] = []  # shard, offset, size, cls, name
        for si, shard in enumerate(self.shards):
            imgs: dict[str, tuple[int, int, str]] = {}
            labels: dict[str, int] = {}
            try:
                with tarfile.open(shard, "r:") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        key, ext = os.path.splitext(m.name)
                        ext = ext.lower()
                        if ext in IMG_EXT:
                            imgs[key] = (m.offset_data, m.size, m.name)
                        elif ext == ".cls":
                            raw = tf.extractfile(m).read().decode().strip()
                            try:
                                labels[key] = int(raw)
                            except ValueError:
                                raise DataError(f"shard {shard}: {m.name} holds '{raw[:20]}', "
                                                f"not a class index") from None
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"corrupt shard {shard}: {e}") from None
            missing = [k for k in imgs if k not in labels]
            if missing:
                raise DataError(f"shard {shard}: no .cls label for {missing[:3]}")
            for key in sorted(imgs):
                off, size, name = imgs[key]
                self.samples.append((si, off, size, labels[key], name))
        if not self.samples:
            raise DataError(f"no samples (image + .cls pairs) in the shards of {self.root}")
        self.targets = [s[3] for s in self.samples]
        self.skipped: list[tuple[str, str]] = []
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int):
        si, off, size, target, name = self.samples[i]
        f = self._handles.get(si)
        if f is None:
            f = self._handles[si] = open(self.shards[si], "rb")
        f.seek(off)
        data = f.read(size)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert(self.mode), target
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {name} in shard {self.shards[si]}: {e}") from None

    def __getitem__(self, i: int):
        for attempt in range(min(len(self.samples), 50)):
            try:
                img, target = self._read((i + attempt) % len(self.samples))
                break
            except DataError as e:
                self.skipped.append((str(i), str(e)))
                log.warning("skipping: %s (%d skipped so far in this process)", e,
                            len(self.skipped))
        else:
            raise DataError(f"no readable image near index {i} in {self.root}")
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __getstate__(self):  # file handles are per worker process
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d
