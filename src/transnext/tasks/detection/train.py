"""The detection training job (Mask R-CNN, DINO): mmdet's step schedule (AdamW, linear
warm-up by iteration, lr x0.1 at the step epochs), grouped aspect-ratio batches, seeded
augmentation (flips; DINO: DETR's multi-scale resize and crop),
AMP, torch.compile of the backbone, torchrun DDP, atomic checkpoints with exact resume
(mid-epoch too), progress bar, CSV/JSON/TensorBoard logs, an optional wall-clock budget.
Reuses the engine's checkpointing, distributed and logging pieces."""
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
from ...engine.models import unwrap
from ...engine.train import ThreadProbe, seed_all, set_deterministic
from ...models import CheckpointError, apply_checkpoint
from ..common.checkpoints import backward_and_step, closing_loop, save_last_and_best
from ..common.released import read_any, released_kind, state_dict_of
from ..common.schedule import TimeBudget, warmup_factor
from . import recipes
from .canvas import graph_holder, train_canvases, use_canvases
from .coco import CocoDetection, RandomHorizontalFlip, collate, resolve_coco
from .convert import load_maskrcnn_state
from .evaluate import (CONFIG_KEY, _other_kind, build_from_config, describe_config, evaluate,
                       is_training_checkpoint)
from .maskrcnn import param_groups
from .sampler import GroupedBatchSampler
from .dino import param_groups as dino_param_groups
from .transforms import DetrMultiScaleAug

log = logging.getLogger("transnext.det.train")
REPROBE_EVERY = 250  # iterations between --threads auto decisions
# The loss terms a run logs (DINO's total also holds the other decoder layers' terms).
LOGGED_LOSSES = {
    "mask-rcnn": ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                  "loss_mask"),
    "dino": ("loss_cls", "loss_bbox", "loss_iou", "enc_loss_cls", "dn_loss_cls"),
}


def is_dino(arch: str) -> bool:
    return arch.startswith("dino")


def lr_factor(it: int, epoch_progress: float, steps, warmup: int, warmup_ratio: float,
              gamma: float = 0.1) -> float:
    """mmcv's step schedule (x ``gamma`` at each step epoch reached) times its linear
    warm-up by iteration; ``epoch_progress``: epochs done, fractional."""
    n = sum(1 for s in steps if epoch_progress >= s)
    return gamma ** n * warmup_factor(it, warmup, warmup_ratio)


def build_config(args, num_classes: int) -> dict:
    """The build options of a run, kept in its checkpoints (``det_config``)."""
    if is_dino(args.arch):
        return dict(
            arch=args.arch, model=args.model, num_classes=num_classes,
            img_size=args.img_size or args.min_size, pos_bias=args.pos_bias,
            pretrain_size=args.pretrain_size, min_size=args.min_size,
            max_size=args.max_size, drop_path_rate=args.drop_path,
            num_queries=args.num_queries, num_dn_queries=args.dn_queries,
            label_noise=args.label_noise, box_noise=args.box_noise,
            detections=args.detections, embed_dims=args.embed_dims, ffn_dims=args.ffn_dims,
            enc_layers=args.enc_layers, dec_layers=args.dec_layers)
    return dict(
        arch=args.arch, model=args.model, num_classes=num_classes,
        img_size=args.img_size or args.min_size, pos_bias=args.pos_bias,
        pretrain_size=args.pretrain_size, min_size=args.min_size, max_size=args.max_size,
        drop_path_rate=args.drop_path, fpn_channels=args.fpn_channels, box_fc=args.box_fc,
        mask_channels=args.mask_channels, anchor_scale=float(args.anchor_scale),
        rpn_batch_size_per_image=args.rpn_batch, box_batch_size_per_image=args.roi_batch,
        rpn_pre_nms_top_n_train=args.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=args.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=args.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=args.rpn_post_nms_test, box_detections_per_img=args.detections)


def _load_pretrained(model, path: str, cfg: dict) -> None:
    """An ImageNet backbone checkpoint, a released Mask R-CNN or DINO ``.pth`` (of the
    run's architecture) or a ``det train`` checkpoint of the same model (variant and class
    count)."""
    try:
        obj = read_any(path)
        kind = released_kind(obj, path)
        if is_training_checkpoint(obj):
            theirs = obj[CONFIG_KEY]
            if (theirs.get("arch"), theirs.get("model"), theirs.get("num_classes")) != \
                    (cfg["arch"], cfg["model"], cfg["num_classes"]):
                raise UserError(f"--pretrained {path} holds a {describe_config(theirs)}, "
                                f"this run is a {describe_config(cfg)}")
            try:
                model.load_state_dict(obj["model"], strict=True)
            except RuntimeError as e:
                raise UserError(f"--pretrained {path} does not fit this model (other head "
                                f"widths?): {' '.join(str(e).split())[:300]}") from None
        elif "seg_config" in obj:
            raise UserError(f"--pretrained {path} is {_other_kind(obj)}, not a backbone or "
                            f"detector checkpoint")
        elif kind in ("Mask R-CNN", "DINO"):
            want = "DINO" if is_dino(cfg["arch"]) else "Mask R-CNN"
            if kind != want:
                raise UserError(f"--pretrained {path} is a released {kind}, this run trains "
                                f"a {cfg['arch']}")
            if kind == "DINO":
                from .convert_dino import load_dino_state
                load_dino_state(model, state_dict_of(obj, path), f"--pretrained {path}")
            else:
                load_maskrcnn_state(model, state_dict_of(obj, path), f"--pretrained {path}")
        else:  # an ImageNet (or another dense task's) backbone: the package's loader
            body = model.backbone if is_dino(cfg["arch"]) else model.backbone.body
            apply_checkpoint(body, obj, f"--pretrained {path}")
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


def _datasets(args):
    train_ann, train_img = resolve_coco(args.data_dir, "train", args.train_ann, args.train_images)
    masks = not is_dino(args.arch)  # DINO is a box detector: no masks decoded
    if masks:
        aug = RandomHorizontalFlip(args.flip, seed=args.seed)
    else:
        aug = DetrMultiScaleAug(args.ms_scales, args.max_size, args.crop_scales,
                                args.crop_max_size, args.crop_range, flip=args.flip,
                                seed=args.seed)
    train_ds = CocoDetection(train_ann, train_img, train=True, with_masks=masks, transform=aug)
    if len(train_ds) == 0:
        raise UserError(f"no training image left in {train_ann}: "
                        f"{train_ds.report.images_filtered} image(s) without a usable annotation "
                        f"or under 32 px were left out"
                        + (f" ({train_ds.report.summary()})" if train_ds.report.n_skipped else ""))
    val_ds = None
    if args.val_ann or args.data_dir:
        try:
            val_ann, val_img = resolve_coco(args.data_dir, "val", args.val_ann, args.val_images)
        except Exception as e:  # noqa: BLE001 - a missing val split only disables evaluation
            if args.val_ann or "not found" not in str(e):
                raise
            log.warning("no validation split (%s): training without evaluation", e)
        else:
            val_ds = CocoDetection(val_ann, val_img, with_masks=masks)
            if val_ds.class_names != train_ds.class_names:
                raise UserError(f"{val_ann} and {train_ann} list other categories "
                                f"({len(val_ds.class_names)} vs {len(train_ds.class_names)})")
    if not args.no_verify:
        train_ds.check_images(workers=max(2, args.workers))
        if val_ds is not None:
            val_ds.check_images(workers=max(2, args.workers))
    return train_ds, val_ds, aug  # what loading skipped was logged (one line per json)


def optimizer_groups(model, args) -> list[dict]:
    """Mask R-CNN: the released no-decay set; DINO: the released configs' groups (no decay
    on 1-D parameters and the TransNeXt position parameters, the backbone's learning rate
    ``--backbone-lr-mult`` x; ``dino.param_groups``)."""
    if not is_dino(args.arch):
        groups = param_groups(model, args.weight_decay)
        for g in groups:
            g["lr"] = g["initial_lr"] = args.lr
        return groups
    return dino_param_groups(model, args.lr, args.weight_decay, args.backbone_lr_mult)


def _batches(ds, aug, sampler, args, start_it, per_epoch, device):
    """(epoch, images, targets) from iteration ``start_it`` on, epoch after epoch. The
    grouped batches and the augmentation depend on (seed, epoch, index) only, so a resumed run
    skips the batches already done and sees the same data."""
    epoch, skip = divmod(start_it, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        aug.set_epoch(epoch)
        batches = list(sampler)[skip:]
        gen = torch.Generator().manual_seed(args.seed * 7 + epoch)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=args.workers, collate_fn=collate,
            generator=gen, pin_memory=device.type == "cuda", persistent_workers=False)
        for images, targets in loader:
            yield epoch, images, targets
        epoch, skip = epoch + 1, 0


def _to_device(images, targets, device):
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
    return images, targets


def _train(args, dist) -> dict:
    device, main = dist.device, dist.is_main
    if args.cuda_graphs:
        check_cuda_graphs(device, compiled=args.compile)
    if args.deterministic:
        set_deterministic()
    out = Path(args.output)
    resume_obj = None
    if args.resume:
        resume_obj = ckpt.read_file(args.resume)
        if not is_training_checkpoint(resume_obj):
            raise UserError(f"--resume {args.resume} is not a checkpoint of `transnext det "
                            f"train` (use --pretrained to start from weights)")
    if args.threads and args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    train_ds, val_ds, aug = _datasets(args)
    num_classes = train_ds.num_classes
    cfg = build_config(args, num_classes)
    if resume_obj is not None and resume_obj[CONFIG_KEY] != cfg:
        theirs = resume_obj[CONFIG_KEY]
        diff = [k for k in sorted(set(cfg) | set(theirs)) if cfg.get(k) != theirs.get(k)]
        raise UserError(f"cannot resume from {args.resume}: it holds a "
                        f"{describe_config(theirs)}, this run builds a {describe_config(cfg)}"
                        f" (differs in {', '.join(diff[:6])})")
    world_batch = args.batch_size * dist.world_size
    if main and args.global_batch and world_batch != args.global_batch:
        print(f"note: global batch {world_batch} ({args.batch_size} x {dist.world_size} "
              f"process(es)); the recipe was tuned for {args.global_batch} (its learning "
              f"rate is kept: scale --lr yourself if you want the linear rule)", flush=True)

    seed_all(args.seed)  # identical initial weights on every rank and across runs
    model = build_from_config(cfg, init=True)
    model.class_names = list(train_ds.class_names)
    if args.pretrained and resume_obj is None:
        _load_pretrained(model, args.pretrained, cfg)
    model.to(device)
    seed_all(args.seed + dist.rank)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args), lr=args.lr,
                                  betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    sampler = GroupedBatchSampler(train_ds.sizes, args.batch_size, seed=args.seed,
                                  num_replicas=dist.world_size, rank=dist.rank)
    per_epoch = len(sampler)
    total = args.epochs * per_epoch
    start_it, best, train_elapsed = 0, -1.0, 0.0
    if resume_obj is not None:
        model.load_state_dict(resume_obj["model"])
        optimizer.load_state_dict(resume_obj["optimizer"])
        if scaler is not None and resume_obj.get("scaler"):
            scaler.load_state_dict(resume_obj["scaler"])
        start_it, best = int(resume_obj["iter"]), float(resume_obj.get("best_box_ap", -1.0))
        train_elapsed = float(resume_obj.get("train_elapsed", 0.0))
        if int(resume_obj.get("iters_per_epoch", per_epoch)) != per_epoch:
            raise UserError(f"cannot resume from {args.resume}: it ran "
                            f"{resume_obj['iters_per_epoch']} iterations per epoch, this run "
                            f"{per_epoch} (another data set, batch size or process count)")
        if start_it >= total:
            raise UserError(f"--resume {args.resume}: that run has finished {start_it} "
                            f"iterations ({start_it // per_epoch} epochs) and --epochs is "
                            f"{args.epochs}; pass a larger --epochs to continue it")
        rngs = resume_obj.get("rng") or []
        if rngs:
            ckpt.set_rng_state(rngs[dist.rank % len(rngs)])
        if main:
            log.info("resumed from %s at iteration %d (epoch %d)", args.resume, start_it,
                     start_it // per_epoch + 1)
        del resume_obj
    sync, holder = None, None
    if args.cuda_graphs:
        canvases = train_canvases(args.ms_scales if is_dino(args.arch) else args.min_size,
                                  args.max_size)
        use_canvases(model, canvases)
        holder = graph_holder(model)
        # validation keeps eval's padding (a canvas would change its numbers): one inference
        # graph per padded shape, as `det eval --cuda-graphs`
        holder.use_cuda_graphs(max_graphs=len(canvases), infer=True,
                               max_infer_graphs=INFER_GRAPHS)
        if main:
            log.info("CUDA graphs of the backbone; training batches padded to %s",
                     " or ".join(f"{h}x{w}" for h, w in canvases))
        if dist.distributed:  # not DDP: the recording must not meet DDP's hooks
            sync = GradientAverager(model, uneven=True)  # the heads run eagerly
    elif args.compile:
        model.backbone.compile()  # TransNeXt + FPN, in place: parameter names stay the same
    net = model
    if dist.distributed and sync is None:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    probe, probe_from, many = None, start_it, torch.get_num_threads()
    if args.threads == "auto" and device.type == "cpu":
        probe = ThreadProbe(total - start_it, dist)  # N threads vs 1, keep the faster

    batches = _batches(train_ds, aug, sampler, args, start_it, per_epoch, device)
    mlog = MetricLog(out, enabled=main, tensorboard=not args.no_tensorboard)
    ckpt_every = args.ckpt_interval or per_epoch
    bar = None
    if main and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start_it, desc="det train", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%s on %s: %.2fM params, %d classes, %d train images (%d iterations "
                 "per epoch) x %d process(es), device %s", args.arch, args.model, n_params / 1e6,
                 num_classes, len(train_ds), per_epoch, dist.world_size, device)
    summary = {"output": str(out), "epochs": args.epochs}
    budget = None
    if args.time_budget:
        budget = TimeBudget(args.time_budget, train_elapsed, reserve=args.eval_reserve)
    loss_names = LOGGED_LOSSES["dino" if is_dino(args.arch) else args.arch]
    sums = torch.zeros(7, dtype=torch.float64)  # 5 logged terms, total, count
    t0, it = time.time(), start_it
    with closing_loop(out, main, bar, mlog, lambda: it):
        net.train()
        while it < total:
            epoch, images, targets = next(batches)
            images, targets = _to_device(images, targets, device)
            progress = budget.progress(it, total, device) if budget is not None else it / total
            f = lr_factor(it, progress * args.epochs, args.steps, args.warmup_iters,
                          args.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f
            with autocast(device, args.amp):
                losses = net(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at iteration {it + 1} "
                                f"({', '.join(f'{k} {v.item():.3g}' for k, v in losses.items())})"
                                f": lower --lr, use --clip-grad or --amp none")
            backward_and_step(loss, model, optimizer, scaler, args.clip_grad, sync=sync)
            it += 1
            vals = [losses[k].item() if k in losses else 0.0 for k in loss_names]
            sums += torch.tensor([*vals, loss.item(), 1.0], dtype=torch.float64)
            if probe is not None:
                probe.after_batch(it - probe_from - 1)
                if probe.done and it - probe_from >= REPROBE_EVERY and it < total:
                    # a shared CPU changes under a long run: decide again now and then
                    probe, probe_from = ThreadProbe(total - it, dist, many=many, start=1), it
            if budget is not None and budget.last_iteration(it, total, device, bar):
                total = it
                if main:
                    log.info("time budget %.0fs: stopping after %d iterations (%.2f epochs)",
                             args.time_budget, it, it / per_epoch)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", **{
                                    k.replace("loss_", ""): f"{v:.3f}"
                                    for k, v in zip(loss_names[2:], vals[2:4])},
                                ep=f"{it / per_epoch:.2f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
                bar.update(1)
            row = None
            end_epoch = it % per_epoch == 0 or it == total
            if it % args.log_interval == 0 or end_epoch:
                s = sums.to(device)
                all_reduce_sum(s)  # the mean over every rank's batches, not rank 0's alone
                s = (s[:6] / s[6].clamp(min=1)).tolist()
                row = {"epoch": it, "iter": it, "epochs_done": it / per_epoch, "train_loss": s[5],
                       **{f"train_{k}": v for k, v in zip(loss_names, s[:5])},
                       "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0}
                sums.zero_()
            if it % ckpt_every == 0 or end_epoch:
                is_best = False
                n_ep = -(-it // per_epoch)
                if val_ds is not None and ((end_epoch and n_ep % args.eval_interval == 0)
                                           or it == total):
                    res, _ = evaluate(model, val_ds, device, rank=dist.rank,
                                      world_size=dist.world_size, amp=args.amp,
                                      batch_size=args.eval_batch_size, workers=args.workers,
                                      progress=main and args.progress,
                                      with_masks=not is_dino(args.arch))
                    row = dict(row or {"epoch": it, "iter": it, "epochs_done": it / per_epoch})
                    for t, m in res.items():
                        row.update({f"val_{t}_{k}": v for k, v in m.items()})
                    box_ap = res["bbox"]["AP"]
                    is_best = box_ap > best
                    best = max(best, box_ap)
                    summary.update(row)
                    if main:
                        mask = (f", mask AP {res['segm']['AP']:.1f} (AP50 "
                                f"{res['segm']['AP50']:.1f})" if "segm" in res else "")
                        print(f"epoch {it / per_epoch:.2f} (iteration {it}): box AP "
                              f"{box_ap:.1f} (AP50 {res['bbox']['AP50']:.1f}){mask}",
                              flush=True)
                    net.train()
                elapsed = budget.elapsed() if budget is not None else 0.0
                save_last_and_best(out, lambda rng: _state(
                    args, model, cfg, train_ds, optimizer, scaler, it, per_epoch, best, rng, row,
                    elapsed), is_best, main)
            if row is not None and main:
                mlog.log(row)
            if args.stop_after_iters and it - start_it >= args.stop_after_iters:
                break
    if holder is not None and main:
        log.info(graph_summary(holder.graphed))
    summary.update({"best_box_AP": best, "checkpoint": str(out / "last.pth"), "iter": it,
                    "iters_per_epoch": per_epoch, "train_time": time.time() - t0})
    return summary


def _state(args, model, cfg, train_ds, optimizer, scaler, it, per_epoch, best, rng_all, row,
           train_elapsed) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        CONFIG_KEY: cfg,
        "class_names": list(train_ds.class_names),
        "cat_ids": list(train_ds.cat_ids),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iter": it,
        "iters_per_epoch": per_epoch,
        "epoch": it / per_epoch,
        "train_elapsed": train_elapsed,
        "best_box_ap": best,
        "rng": rng_all,
        "arch": args.arch,
        "args": ckpt.primitives(vars(args)),
        "metrics": ckpt.primitives(row or {}),
    }
