"""The segmentation training job: iteration-based (poly schedule with linear
warm-up, mmseg's), AMP, torch.compile, torchrun DDP (SyncBN on CUDA), gradient
clipping, per-group learning-rate multipliers, atomic checkpoints with exact
resume, progress bar, CSV/JSON/TensorBoard logs. Reuses the engine's
checkpointing, distributed and logging pieces."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ...engine import checkpointing as ckpt
from ...engine.distributed import all_gather_object, barrier, cleanup, init_distributed
from ...engine.errors import UserError
from ...engine.evaluate import autocast
from ...engine.metrics import MetricLog
from ...engine.models import unwrap
from ...engine.train import seed_all, set_deterministic
from ...models import CheckpointError, apply_checkpoint
from . import recipes
from .convert import head_kind, load_upernet_state, read_any, state_dict_of
from .data import EvalTransform, SegDataset, TrainAug, collate
from .evaluate import evaluate, is_training_checkpoint
from .model import build_upernet

log = logging.getLogger("transnext.seg.train")


def lr_factor(it: int, iters: int, warmup: int, warmup_ratio: float, power: float) -> float:
    """mmseg's poly schedule (min lr 0) times its linear warm-up."""
    f = (1.0 - min(it, iters) / iters) ** power
    if it < warmup:
        f *= 1.0 - (1.0 - it / warmup) * (1.0 - warmup_ratio)
    return f


def param_groups(model, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0):
    """AdamW groups: no decay on 1-D parameters (norms, biases) and the TransNeXt
    parameters of SPEC section 9 (query_embedding, relative_pos_bias_local, cpb,
    temperature); the backbone's learning rate times ``backbone_lr_mult``."""
    no_decay_words = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not any(w in name for w in no_decay_words)
        backbone = name.startswith("backbone.")
        key = (decay, backbone)
        if key not in groups:
            mult = backbone_lr_mult if backbone else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * mult, "initial_lr": lr * mult}
        groups[key]["params"].append(p)
    return list(groups.values())


class TrainSampler(torch.utils.data.Sampler):
    """An epoch's permutation (seeded by seed + epoch, the same on every rank),
    truncated to whole global batches, this rank's share, from batch ``start`` on."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.per_rank = (n // (batch * world)) * batch
        if self.per_rank == 0:
            raise UserError(f"the training set has {n} images, fewer than one global batch "
                            f"({batch} x {world} processes): lower --batch-size")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        mine = perm[self.rank::self.world].tolist()
        return iter(mine[self.start * self.batch:])

    def __len__(self):
        return self.per_rank - self.start * self.batch

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch


def _batches(ds, aug, sampler, args, start_it, device):
    """Batches from iteration ``start_it`` on, epoch after epoch; worker seeds come
    from a generator of (seed, epoch), not from the global RNG (exact resume)."""
    per_epoch = sampler.batches_per_epoch
    epoch, skip = divmod(start_it, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip)
        aug.set_epoch(epoch)
        gen = torch.Generator().manual_seed(args.seed * 7 + epoch)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
            collate_fn=collate, generator=gen, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=False)
        for x, y, _ in loader:
            yield x, y
        epoch, skip = epoch + 1, 0


def _load_pretrained(model, path: str) -> None:
    """An ImageNet backbone checkpoint, or a segmentation one (released UperNet or
    ours) with the same head layout."""
    try:
        obj = read_any(path)
        if is_training_checkpoint(obj):
            missing, unexpected = model.load_state_dict(obj["model"], strict=False)
            if missing or unexpected:
                raise UserError(f"--pretrained {path} does not fit this model: {len(missing)} "
                                f"missing, {len(unexpected)} unexpected keys")
        elif head_kind(state_dict_of(obj, path)) == "UperNet":
            load_upernet_state(model, state_dict_of(obj, path), f"--pretrained {path}")
        else:
            apply_checkpoint(model.backbone.model, obj, f"--pretrained {path}")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    log.info("loaded pretrained weights from %s", path)


def train(args) -> dict:
    recipes.resolve(args)
    dist = init_distributed(args.device)
    try:
        return _train(args, dist)
    finally:
        cleanup()


def _check_args(args) -> None:
    if not args.model:
        raise UserError("--model is required (or a --recipe that names one)")
    if not args.output:
        raise UserError("--output is required")
    if not args.data_dir:
        raise UserError("--data-dir is required")
    if args.head != "upernet":
        raise UserError(f"--head {args.head}: only upernet is available in this version")
    for flag in ("iters", "batch_size", "crop_size"):
        if int(getattr(args, flag)) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer")


def _train(args, dist) -> dict:
    _check_args(args)
    device, main = dist.device, dist.is_main
    if args.deterministic:
        set_deterministic()
    out = Path(args.output)
    resume_obj = None
    if args.resume:
        resume_obj = ckpt.read_file(args.resume)
        if not is_training_checkpoint(resume_obj):
            raise UserError(f"--resume {args.resume} is not a checkpoint of `transnext seg "
                            f"train` (use --pretrained to start from weights)")
    scale = tuple(args.scale) if args.scale else (4 * args.crop_size, args.crop_size)
    aug = TrainAug(args.crop_size, scale, cat_max_ratio=args.cat_max_ratio, seed=args.seed)
    train_ds = SegDataset(args.data_dir, args.dataset, "train", transform=aug,
                          verify=not args.no_verify)
    val_ds = None
    try:
        val_ds = SegDataset(args.data_dir, args.dataset, "val",
                            transform=EvalTransform(tuple(args.test_scale) if args.test_scale
                                                    else None), verify=not args.no_verify)
    except Exception as e:  # noqa: BLE001 - a missing val split only disables evaluation
        if "missing folder" not in str(e):
            raise
        log.warning("no validation split (%s): training without evaluation", e)
    num_classes = train_ds.num_classes
    img_size = args.img_size or (args.crop_size if args.pos_bias == "interpolate" else None)

    seed_all(args.seed)
    model = build_upernet(args.model, num_classes, pos_bias=args.pos_bias, img_size=img_size,
                          pretrain_size=args.pretrain_size, drop_path_rate=args.drop_path,
                          channels=args.channels, aux_channels=args.aux_channels,
                          id2label=dict(enumerate(train_ds.classes)))
    if args.pretrained and resume_obj is None:
        _load_pretrained(model, args.pretrained)
    if resume_obj is not None and resume_obj["seg_config"] != model.config.to_dict():
        raise UserError(f"cannot resume from {args.resume}: it was trained with another "
                        f"model, head or class count")
    model.to(device)
    if dist.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_all(args.seed + dist.rank)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay,
                                               args.backbone_lr_mult),
                                  lr=args.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_it, best = 0, -1.0
    if resume_obj is not None:
        model.load_state_dict(resume_obj["model"])
        optimizer.load_state_dict(resume_obj["optimizer"])
        if scaler is not None and resume_obj.get("scaler"):
            scaler.load_state_dict(resume_obj["scaler"])
        start_it, best = int(resume_obj["iter"]), float(resume_obj.get("best_miou", -1.0))
        rngs = resume_obj.get("rng") or []
        if rngs:
            ckpt.set_rng_state(rngs[dist.rank % len(rngs)])
        if main:
            log.info("resumed from %s at iteration %d", args.resume, start_it)
        del resume_obj
    net = torch.compile(model) if args.compile else model
    if dist.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.threads:
        torch.set_num_threads(int(args.threads))

    sampler = TrainSampler(len(train_ds), args.batch_size, args.seed, dist.rank, dist.world_size)
    batches = _batches(train_ds, aug, sampler, args, start_it, device)
    mlog = MetricLog(out, enabled=main, tensorboard=not args.no_tensorboard)
    ckpt_every = args.ckpt_interval or args.iters
    eval_every = args.eval_interval or ckpt_every
    bar = None
    if main and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=args.iters, initial=start_it, desc="seg train", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("UperNet on %s: %.2fM params, %d classes, %d train images x %d process(es), "
                 "device %s", args.model, n_params / 1e6, num_classes, len(train_ds),
                 dist.world_size, device)
    summary = {"output": str(out), "iters": args.iters}
    loss_sum, loss_n, t0, it = 0.0, 0, time.time(), start_it
    try:
        net.train()
        while it < args.iters:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            f = lr_factor(it, args.iters, args.warmup_iters, args.warmup_ratio, args.power)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f
            with autocast(device, args.amp):
                loss = net(x, labels=y).loss
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at iteration {it + 1}: lower --lr, "
                                f"use --clip-grad or --amp none")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                refresh=False)
                bar.update(1)
            row = None
            if it % args.log_interval == 0 or it == args.iters:
                row = {"epoch": it, "iter": it, "train_loss": loss_sum / loss_n,
                       "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0}
                loss_sum, loss_n = 0.0, 0
            if it % ckpt_every == 0 or it == args.iters:
                is_best = False
                if val_ds is not None and (it % eval_every == 0 or it == args.iters):
                    res = evaluate(model, val_ds, device, rank=dist.rank,
                                   world_size=dist.world_size, amp=args.amp, mode=args.mode,
                                   test_scale=tuple(args.test_scale) if args.test_scale else None,
                                   batch_size=args.eval_batch_size, crop=args.crop_size,
                                   stride=max(1, args.crop_size * 2 // 3))
                    row = dict(row or {"epoch": it, "iter": it})
                    row.update({"val_mIoU": res["mIoU"], "val_mAcc": res["mAcc"],
                                "val_aAcc": res["aAcc"]})
                    is_best = res["mIoU"] > best
                    best = max(best, res["mIoU"])
                    summary.update(row)
                    if main:
                        print(f"iter {it}/{args.iters}: val mIoU {res['mIoU']:.2f} mAcc "
                              f"{res['mAcc']:.2f} aAcc {res['aAcc']:.2f}", flush=True)
                    net.train()
                rng_all = all_gather_object(ckpt.rng_state())
                if main:
                    state = _state(args, model, optimizer, scaler, it, best, rng_all, row)
                    ckpt.save_atomic(state, out / "last.pth")
                    if is_best:
                        ckpt.save_atomic(state, out / "best.pth")
                barrier()
            if row is not None and main:
                mlog.log(row)
            if args.stop_after_iters and it - start_it >= args.stop_after_iters:
                break
    except KeyboardInterrupt:
        if main:
            last = out / "last.pth"
            print(f"\ninterrupted at iteration {it}; " + (f"resume with --resume {last}"
                  if last.exists() else "no checkpoint yet"), file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        mlog.close()
    summary.update({"best_mIoU": best, "checkpoint": str(out / "last.pth"), "iter": it,
                    "train_time": time.time() - t0})
    return summary


def _state(args, model, optimizer, scaler, it, best, rng_all, row) -> dict:
    m = unwrap(model)
    return {
        "model": m.state_dict(),
        "seg_config": m.config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iter": it,
        "best_miou": best,
        "rng": rng_all,
        "model_name": args.model,
        "head": args.head,
        "args": ckpt.primitives(vars(args)),
        "metrics": ckpt.primitives(row or {}),
    }
