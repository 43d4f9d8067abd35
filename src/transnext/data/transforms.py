"""Train and eval transforms, built from timm's factory."""
from __future__ import annotations

from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from timm.data.transforms import str_to_interp_mode


def eval_transform(size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                   crop_pct: float = 0.875, interpolation: str = "bicubic", gray: bool = False):
    """SPEC section 8: below 384 resize the short side to size/crop_pct and centre
    crop; at 384 and above resize to size x size with no crop."""
    interp = str_to_interp_mode(interpolation)
    if size >= 384:
        ops = [T.Resize((size, size), interpolation=interp)]
    else:
        ops = [T.Resize(int(size / crop_pct), interpolation=interp), T.CenterCrop(size)]
    if gray:
        ops.append(T.Grayscale(1))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def train_transform(size: int, *, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    auto_augment: str | None = None, color_jitter: float | None = 0.4,
                    reprob: float = 0.0, interpolation: str = "bicubic", hflip: float = 0.5,
                    scale=(0.08, 1.0)):
    """timm's RandomResizedCrop + flip + RandAugment/colour jitter + random erasing."""
    return create_transform(
        size, is_training=True, auto_augment=auto_augment or None,
        color_jitter=color_jitter if not auto_augment else color_jitter,
        re_prob=reprob, re_mode="pixel", re_count=1, interpolation=interpolation,
        mean=mean, std=std, hflip=hflip, scale=scale)
