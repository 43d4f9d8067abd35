"""ImageFolder datasets (``root/<class>/<image>``) with clear errors for bad input.

Corrupt or truncated images are a documented skip: by default every file is
checked once when the dataset is built (header parse + full decode), the bad
ones are left out, and one warning names how many and which. With
``verify=False`` (``--no-verify``, for sets too large to check up front) a file
that fails to decode when it is loaded is skipped then: a warning names it, the
next sample is served in its place, and ``skipped`` counts it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from .fashion_mnist import DataError

log = logging.getLogger("transnext.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_image(path: str | os.PathLike) -> str | None:
    """Returns None if the file decodes completely, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixel data: load it too
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image fully decoded in ``mode``; errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: corrupt or truncated ({e})") from None


def list_class_dirs(root: Path) -> list[str]:
    if not root.exists():
        raise DataError(f"data directory does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    return classes


class ImageFolder:
    """A map-style dataset over ``root/<class>/*.<image ext>``.

    ``class_to_idx`` may be given to place folders on fixed outputs (e.g.
    ImageNet wnids onto the 1000 outputs); folders it does not name are an
    error. ``verify`` checks every image up front (see module doc).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *,
                 class_to_idx: dict[str, int] | None = None, verify: bool = True,
                 mode: str = "RGB", classes: Sequence[str] | None = None):
        self.root = Path(root)
        self.transform = transform
        self.mode = mode
        folders = list_class_dirs(self.root)
        if class_to_idx is None:
            if classes is not None:
                missing = [c for c in folders if c not in classes]
                if missing:
                    raise DataError(f"{self.root}: class folders {missing[:5]} are not among the "
                                    f"training classes")
                class_to_idx = {c: i for i, c in enumerate(classes)}
                self.classes = list(classes)
            else:
                class_to_idx = {c: i for i, c in enumerate(folders)}
                self.classes = folders
        else:
            unknown = [c for c in folders if c not in class_to_idx]
            if unknown:
                raise DataError(f"{self.root}: unknown class folders {unknown[:5]}")
            self.classes = folders
        self.class_to_idx = class_to_idx
        samples = []
        for c in folders:
            files = sorted(e.path for e in os.scandir(self.root / c)
                           if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise DataError(f"empty class folder (no image files): {self.root / c}")
            samples.extend((f, class_to_idx[c]) for f in files)
        self.skipped: list[tuple[str, str]] = []
        if verify:
            good = []
            for f, t in samples:
                why = check_image(f)
                if why is None:
                    good.append((f, t))
                else:
                    self.skipped.append((f, why))
            if self.skipped:
                names = ", ".join(f for f, _ in self.skipped[:20])
                more = "" if len(self.skipped) <= 20 else f" and {len(self.skipped) - 20} more"
                log.warning("skipped %d corrupt or truncated image(s) in %s: %s%s",
                            len(self.skipped), self.root, names, more)
            samples = good
            if not samples:
                raise DataError(f"no readable images in {self.root}")
        self.verified = verify
        self._bad: set[str] = set()
        self.samples = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for attempt in range(min(len(self.samples), 50)):
            path, target = self.samples[(i + attempt) % len(self.samples)]
            try:
                img = load_image(path, self.mode)
                break
            except DataError as e:
                if self.verified:
                    raise
                if path not in self._bad:
                    self._bad.add(path)
                    self.skipped.append((path, str(e)))
                    log.warning("skipping corrupt or truncated image %s (%d skipped so far in "
                                "this process)", path, len(self.skipped))
        else:
            raise DataError(f"no readable image near index {i} in {self.root}")
        if self.transform is not None:
            img = self.transform(img)
        return img, target
