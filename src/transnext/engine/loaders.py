"""Data loaders for the jobs: the Fashion-MNIST tensor fast path and ImageFolder
trees through torch's DataLoader with distributed samplers."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from ..data import (DataError, ImageFolder, TensorBatches, eval_transform,
                    fashion_mnist_classes, load_fashion_mnist, train_transform)
from ..data import fashion_mnist as fm
from .errors import UserError


class ShardSampler(Sampler):
    """Evaluation sharding with no padding: rank r takes indices r, r+W, r+2W, ...
    so every sample is counted exactly once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededSampler(Sampler):
    """Yields (epoch, index) pairs for :class:`SeededDataset`."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class SeededDataset(Dataset):
    """A sample's augmentation draws from RNGs seeded by (seed, epoch, index) alone, so
    the images are the same for any worker count, with persistent workers (whose RNGs
    would otherwise run on across epochs) and after a resume mid-run."""

    def __init__(self, ds, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        s = ((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63
        main = get_worker_info() is None  # workers=0: keep the trainer's RNG streams intact
        if main:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)
        try:
            return self.ds[i]
        finally:
            if main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class EpochLoader:
    """A DataLoader plus its sampler, with set_epoch and num_samples."""

    def __init__(self, loader: DataLoader, sampler):
        self.loader = loader
        self.sampler = sampler
        self.dataset = loader.dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _gray(in_chans: int) -> bool:
    return in_chans == 1


def dataset_eval_loader(ds, batch_size, dist, *, workers=2):
    sampler = ShardSampler(len(ds), dist.rank, dist.world_size)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                    pin_memory=dist.device.type == "cuda")
    return EpochLoader(dl, sampler)


def shard_datasets(root, train_tf, eval_tf, in_chans):
    """(train TarShards or None, val TarShards or None, class names) under root."""
    from ..data.shards import TarShards, read_class_names
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory does not exist: {root}")
    mode = "L" if _gray(in_chans) else "RGB"
    train = TarShards(root / "train", train_tf, mode) if train_tf is not None else None
    val = TarShards(root / "val", eval_tf, mode) if (root / "val").is_dir() else None
    names = read_class_names(root)
    if names is None:
        n = max(max(d.targets) for d in (train, val) if d is not None) + 1
        names = [f"class_{i}" for i in range(n)]
    for d in (train, val):
        if d is not None and (max(d.targets) >= len(names) or min(d.targets) < 0):
            raise DataError(f"{d.root}: class index {max(d.targets)} outside the "
                            f"{len(names)} classes of {root / 'classes.txt'}")
    return train, val, names


def folder_eval_loader(root, size, dcfg, batch_size, dist, *, workers=2, in_chans=3,
                       class_to_idx=None, classes=None, verify=True):
    tf = eval_transform(size, dcfg["mean"][:in_chans], dcfg["std"][:in_chans],
                        crop_pct=dcfg.get("crop_pct", 0.875),
                        interpolation=dcfg.get("interpolation", "bicubic"))
    ds = ImageFolder(root, tf, class_to_idx=class_to_idx, classes=classes, verify=verify,
                     mode="L" if _gray(in_chans) else "RGB")
    sampler = ShardSampler(len(ds), dist.rank, dist.world_size)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                    pin_memory=dist.device.type == "cuda", persistent_workers=False)
    return EpochLoader(dl, sampler)


def build_train_data(args, dist, dcfg):
    """Returns (train_loader, val_loader or None, class_names, in_chans)."""
    if args.dataset == "fashion-mnist":
        in_chans = args.in_chans or 1
        mean = fm.MEAN * in_chans
        std = fm.STD * in_chans
        try:
            xtr, ytr = load_fashion_mnist(args.data_dir, "train")
            xte, yte = load_fashion_mnist(args.data_dir, "test")
        except DataError as e:
            raise UserError(str(e)) from None
        if args.limit_train:
            xtr, ytr = xtr[: args.limit_train], ytr[: args.limit_train]
        if args.limit_val:
            xte, yte = xte[: args.limit_val], yte[: args.limit_val]
        common = dict(input_size=args.input_size, in_chans=in_chans, mean=mean, std=std,
                      rank=dist.rank, world_size=dist.world_size, device=dist.device)
        aug_on = args.train_aug != "none"
        train = TensorBatches(xtr, ytr, args.batch_size, train=True, seed=args.seed,
                              pad=2 if aug_on else 0, hflip=args.hflip if aug_on else 0.0,
                              drop_last=True, **common)
        val = TensorBatches(xte, yte, args.eval_batch_size or max(args.batch_size, 256),
                            train=False, **common)
        return train, val, fashion_mnist_classes(), in_chans

    if args.dataset not in ("imagefolder", "shards"):
        raise UserError(f"unknown dataset '{args.dataset}' (imagefolder, shards or fashion-mnist)")
    if not args.data_dir:
        raise UserError("--data-dir is required for --dataset imagefolder")
    root = Path(args.data_dir)
    if not root.is_dir():
        raise UserError(f"data directory does not exist: {root}")
    train_root = root / "train"
    if args.dataset != "shards" and not train_root.is_dir():
        raise UserError(f"no train/ folder in {root} (expected {root}/train/<class>/<images>)")
    in_chans = args.in_chans or 3
    mean, std = dcfg["mean"][:in_chans], dcfg["std"][:in_chans]
    if args.train_aug == "none":
        tf = eval_transform(args.input_size, mean, std, crop_pct=dcfg["crop_pct"],
                            interpolation=dcfg["interpolation"])
    else:
        tf = train_transform(args.input_size, mean=mean, std=std, auto_augment=args.aa,
                             color_jitter=args.color_jitter, reprob=args.reprob,
                             interpolation=dcfg["interpolation"], hflip=args.hflip,
                             scale=(args.scale_min, 1.0))
    try:
        if args.dataset == "shards":
            etf = eval_transform(args.input_size, mean, std, crop_pct=dcfg["crop_pct"],
                                 interpolation=dcfg["interpolation"])
            ds, vds, names = shard_datasets(root, tf, etf, in_chans)
            ds.classes = names
        else:
            ds = ImageFolder(train_root, tf, verify=not args.no_verify,
                             mode="L" if _gray(in_chans) else "RGB")
        if args.repeated_aug:
            from timm.data.distributed_sampler import RepeatAugSampler
            sampler = RepeatAugSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                       shuffle=True)
            if len(sampler) < args.batch_size:  # it keeps whole rounds of 256 samples only
                import logging
                logging.getLogger("transnext.train").warning(
                    "repeated augmentation needs more than %d images per rank here; "
                    "using the plain distributed sampler", args.batch_size)
                sampler = None
        else:
            sampler = None
        if sampler is None:
            sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                         shuffle=True, seed=args.seed, drop_last=False)
        sampler = SeededSampler(sampler)
        dl = DataLoader(SeededDataset(ds, args.seed), batch_size=args.batch_size,
                        sampler=sampler, num_workers=args.workers,
                        drop_last=len(sampler) > args.batch_size,
                        pin_memory=dist.device.type == "cuda",
                        persistent_workers=args.workers > 0,
                        # worker seeds from its own generator: starting the workers (once,
                        # they persist) must not draw from the trainer's RNG
                        generator=torch.Generator().manual_seed(args.seed))
        train = EpochLoader(dl, sampler)
        val = None
        val_root = root / "val"
        if args.dataset == "shards":
            if vds is not None:
                val = dataset_eval_loader(vds, args.eval_batch_size or args.batch_size, dist,
                                          workers=args.workers)
        elif val_root.is_dir():
            val = folder_eval_loader(val_root, args.input_size, dcfg,
                                     args.eval_batch_size or args.batch_size, dist,
                                     workers=args.workers, in_chans=in_chans,
                                     classes=ds.classes, verify=not args.no_verify)
    except DataError as e:
        raise UserError(str(e)) from None
    return train, val, ds.classes, in_chans
