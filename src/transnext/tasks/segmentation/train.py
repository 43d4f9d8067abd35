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
from ...engine.cuda_graphs import INFER_GRAPHS, check_cuda_graphs, summary as graph_summary
from ...engine.distributed import GradientAverager, all_reduce_sum, cleanup, init_distributed
from ...engine.errors import UserError
from ...engine.evaluate import autocast
from ...engine.metrics import MetricLog
from ...engine.models import compile_model, unwrap
from ...engine.train import ThreadProbe, seed_all, set_deterministic
from ...models import CheckpointError, apply_checkpoint
from ..common.checkpoints import backward_and_step, closing_loop, save_last_and_best
from ..common.released import read_any, released_kind, state_dict_of
from ..common.schedule import TimeBudget, warmup_factor
from . import recipes
from .convert import load_mask2former_state, load_upernet_state
from .data import EvalTransform, SegDataset, TrainAug, collate
from .evaluate import backbone_of, evaluate, is_training_checkpoint
from .model import build_upernet

log = logging.getLogger("transnext.seg.train")


def lr_factor(it: int, iters: int, warmup: int, warmup_ratio: float, power: float,
              progress: float | None = None) -> float:
    """mmseg's poly schedule (min lr 0) times its linear warm-up; ``progress`` (0-1)
    replaces it / iters under a time budget."""
    p = min(it, iters) / iters if progress is None else min(progress, 1.0)
    return (1.0 - p) ** power * warmup_factor(it, warmup, warmup_ratio)


def param_groups(model, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0):
    """AdamW groups: no decay on 1-D parameters (norms, biases) and the TransNeXt
    parameters of SPEC section 9 (query_embedding, relative_pos_bias_local, cpb,
    temperature); the backbone's learning rate times ``backbone_lr_mult``."""
    no_decay_words = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature",
                      # Mask2Former's (mmseg's paramwise_cfg): query and level embeddings
                      "queries_embedder", "queries_features", "level_embed")
    in_backbone = {id(p) for p in backbone_of(model).parameters()}
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not any(w in name for w in no_decay_words)
        backbone = id(p) in in_backbone
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
        kind = released_kind(obj, path)
        if is_training_checkpoint(obj):
            try:
                model.load_state_dict(obj["model"], strict=True)
            except RuntimeError as e:
                raise UserError(f"--pretrained {path} does not fit this model (another head, "
                                f"variant or class count): {' '.join(str(e).split())[:300]}"
                                ) from None
        elif kind in ("UperNet", "Mask2Former"):
            load = load_mask2former_state if kind == "Mask2Former" else load_upernet_state
            load(model, state_dict_of(obj, path), f"--pretrained {path}")
        else:
            apply_checkpoint(backbone_of(model).model, obj, f"--pretrained {path}")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    log.info("loaded pretrained weights from %s", path)


def build_model(args, num_classes: int, img_size, classes):
    common = dict(pos_bias=args.pos_bias, img_size=img_size, pretrain_size=args.pretrain_size,
                  drop_path_rate=args.drop_path, id2label=dict(enumerate(classes)))
    if args.head == "mask2former":
        try:
            from .mask2former import build_mask2former
            return build_mask2former(args.model, num_classes, **common)
        except ImportError as e:  # transformers' Mask2FormerLoss needs scipy
            raise UserError(f"--head mask2former: {str(e).strip().splitlines()[0]}") from None
    return build_upernet(args.model, num_classes, channels=args.channels,
                         aux_channels=args.aux_channels, **common)


def mask_targets(labels: torch.Tensor, ignore: int = 255):
    """Semantic maps -> per image one binary mask per present class (Mask2Former's
    targets, as mmseg builds them); ignored pixels belong to no mask."""
    masks, classes = [], []
    for y in labels:
        present = torch.unique(y)
        present = present[present != ignore]
        masks.append((y[None] == present[:, None, None]).float())
        classes.append(present.long())
    return masks, classes


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
    for flag in ("iters", "batch_size", "crop_size"):
        if int(getattr(args, flag)) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer")


def _train(args, dist) -> dict:
    _check_args(args)
    device, main = dist.device, dist.is_main
    if getattr(args, "cuda_graphs", False):
        check_cuda_graphs(device, compiled=bool(args.compile or args.compile_mode))
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
    aug = TrainAug(args.crop_size, scale, ratio=tuple(args.ratio_range),
                   cat_max_ratio=args.cat_max_ratio, seed=args.seed)
    train_ds = SegDataset(args.data_dir, args.dataset, "train", transform=aug,
                          verify=not args.no_verify)
    val_ds = None
    try:
        # the test-scale rescale happens in predict(), from the original image
        val_ds = SegDataset(args.data_dir, args.dataset, "val", transform=EvalTransform(None),
                            verify=not args.no_verify)
    except Exception as e:  # noqa: BLE001 - a missing val split only disables evaluation
        if "missing folder" not in str(e):
            raise
        log.warning("no validation split (%s): training without evaluation", e)
    num_classes = train_ds.num_classes
    img_size = args.img_size or (args.crop_size if args.pos_bias == "interpolate" else None)

    seed_all(args.seed)
    model = build_model(args, num_classes, img_size, train_ds.classes)
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
    start_it, best, train_elapsed = 0, -1.0, 0.0
    if resume_obj is not None:
        model.load_state_dict(resume_obj["model"])
        optimizer.load_state_dict(resume_obj["optimizer"])
        if scaler is not None and resume_obj.get("scaler"):
            scaler.load_state_dict(resume_obj["scaler"])
        start_it, best = int(resume_obj["iter"]), float(resume_obj.get("best_miou", -1.0))
        train_elapsed = float(resume_obj.get("train_elapsed", 0.0))
        rngs = resume_obj.get("rng") or []
        if rngs:
            ckpt.set_rng_state(rngs[dist.rank % len(rngs)])
        if main:
            log.info("resumed from %s at iteration %d", args.resume, start_it)
        del resume_obj
    net, graphs, sync = model, args.compile_mode == "reduce-overhead", None
    if getattr(args, "cuda_graphs", False):  # the backbone: the heads' losses sync the host
        # validation too: one inference graph per window batch shape, as `seg eval`
        backbone_of(model).use_cuda_graphs(infer=True, max_infer_graphs=INFER_GRAPHS)
        if dist.distributed:  # not DDP: the recording must not meet DDP's hooks
            sync = GradientAverager(model)
    elif args.compile or args.compile_mode:
        net = compile_model(model, args.compile or "model", args.compile_mode,
                            getattr(args, "compile_backend", "inductor"))
    if dist.distributed and sync is None:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    probe = None
    if args.threads == "auto":
        if device.type == "cpu":  # the engine's probe: N threads vs 1, keep the faster
            probe = ThreadProbe(args.iters - start_it, dist)
    elif args.threads:
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
        log.info("%s on %s: %.2fM params, %d classes, %d train images x %d process(es), "
                 "device %s", type(model).__name__, args.model, n_params / 1e6, num_classes, len(train_ds),
                 dist.world_size, device)
    summary = {"output": str(out), "iters": args.iters}
    loss_sum, loss_n, t0, it = 0.0, 0, time.time(), start_it
    budget = TimeBudget(args.time_budget, train_elapsed) if args.time_budget else None
    with closing_loop(out, main, bar, mlog, lambda: it):
        net.train()
        while it < args.iters:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            progress = budget.progress(it, args.iters, device) if budget is not None else None
            f = lr_factor(it, args.iters, args.warmup_iters, args.warmup_ratio, args.power,
                          progress)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f
            if graphs:  # the last step's CUDA-graph outputs may now be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, args.amp):
                if args.head == "mask2former":
                    masks, classes = mask_targets(y, model.config.ignore_value)
                    loss = net(pixel_values=x, mask_labels=masks, class_labels=classes).loss
                else:
                    loss = net(x, labels=y).loss
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at iteration {it + 1}: lower --lr, "
                                f"use --clip-grad or --amp none")
            backward_and_step(loss, model, optimizer, scaler, args.clip_grad, sync)
            it += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if probe is not None:
                probe.after_batch(it - start_it - 1)
            if budget is not None and budget.last_iteration(it, args.iters, device, bar):
                args.iters = it
                if main:
                    log.info("time budget %.0fs: stopping after %d iterations",
                             args.time_budget, it)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                refresh=False)
                bar.update(1)
            row = None
            if it % args.log_interval == 0 or it == args.iters:
                sums = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64,
                                    device=device)
                all_reduce_sum(sums)  # the mean over every rank's batches, not rank 0's alone
                row = {"epoch": it, "iter": it, "train_loss": (sums[0] / sums[1]).item(),
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
                elapsed = budget.elapsed() if budget is not None else 0.0
                save_last_and_best(out, lambda rng: _state(
                    args, model, optimizer, scaler, it, best, rng, row, elapsed), is_best, main)
            if row is not None and main:
                mlog.log(row)
            if args.stop_after_iters and it - start_it >= args.stop_after_iters:
                break
    graphed = backbone_of(model).graphed
    if graphed is not None and main:
        log.info(graph_summary(graphed))
    summary.update({"best_mIoU": best, "checkpoint": str(out / "last.pth"), "iter": it,
                    "train_time": time.time() - t0})
    return summary


def _state(args, model, optimizer, scaler, it, best, rng_all, row, train_elapsed) -> dict:
    m = unwrap(model)
    return {
        "model": m.state_dict(),
        "seg_config": m.config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iter": it,
        "iters": args.iters,
        "train_elapsed": train_elapsed,
        "best_miou": best,
        "rng": rng_all,
        "model_name": args.model,
        "head": args.head,
        "args": ckpt.primitives(vars(args)),
        "metrics": ckpt.primitives(row or {}),
    }
