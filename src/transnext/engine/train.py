"""The training job: timm's optimizer/scheduler/mixup/loss factories, torch DDP,
atomic checkpoints with exact resume, progress bar and metric logs."""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..models import CheckpointError, TransNeXt, checkpoint_filter_fn
from . import checkpointing as ckpt
from . import recipes
from .cuda_graphs import GraphedForward, check_cuda_graphs, summary as graph_summary
from .distributed import (GradientAverager, all_gather_object, all_reduce_sum, barrier,
                          cleanup, init_distributed)
from .errors import UserError
from .evaluate import autocast, evaluate
from .loaders import build_train_data
from .metrics import MetricLog
from .models import compile_model, create, data_config, unwrap

log = logging.getLogger("transnext.train")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def load_pretrained(model, path: str) -> None:
    """Fine-tuning start: load a published or trained checkpoint, dropping the
    classifier when its class count differs from the model's."""
    obj = ckpt.read_file(path)
    sd = dict(ckpt.state_dict_of(obj))
    if isinstance(model, TransNeXt):  # the package's one key mapping (and variant check)
        try:
            sd = checkpoint_filter_fn(sd, model)
        except CheckpointError as e:
            raise UserError(f"pretrained checkpoint {path} does not fit this model: {e}") from None
    own = model.state_dict()
    head = {k for k, v in sd.items() if k in own and getattr(v, "shape", None) != own[k].shape
            and k.split(".")[0] in ("head", "fc", "classifier")}
    for k in head:
        del sd[k]
    bad = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f"pretrained checkpoint {path} does not fit this model: shape mismatch "
                        f"in {bad[:5]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k.split(".")[0] not in ("head", "fc", "classifier")]
    if missing or len(unexpected) > 0:
        raise UserError(f"pretrained checkpoint {path} does not fit this model: "
                        f"{len(missing)} missing keys {missing[:3]}, "
                        f"{len(unexpected)} unexpected keys {list(unexpected)[:3]}")
    log.info("loaded pretrained weights from %s%s", path,
             " (new classifier: class count differs)" if head else "")


def _grads(model) -> dict:
    return {n: p.grad.detach().cpu().clone() for n, p in unwrap(model).named_parameters()
            if p.grad is not None}


def train(args) -> dict:
    """Run a training job described by an argparse namespace (see cli.py)."""
    recipes.resolve(args)
    dist = init_distributed(args.device)
    try:
        return _train(args, dist)
    finally:
        cleanup()


def _train(args, dist) -> dict:
    main = dist.is_main
    device = dist.device
    if args.deterministic:
        set_deterministic()
    if not args.model:
        raise UserError("--model is required (or a --recipe that names one)")
    if getattr(args, "cuda_graphs", False):
        check_cuda_graphs(device, args.accum_steps,
                          bool(args.compile or getattr(args, "compile_mode", None)))
    if not args.output:
        raise UserError("--output is required")
    out = Path(args.output)
    if args.amp == "fp16" and device.type == "cpu":
        log.warning("fp16 autocast on CPU is slow; bf16 is the CPU choice")
    seed_all(args.seed)

    resume_obj = None
    if args.resume:
        resume_obj = ckpt.read_file(args.resume)
        if not ckpt.is_training_checkpoint(resume_obj):
            raise UserError(f"--resume {args.resume} is not a training checkpoint written by "
                            f"`transnext train` (use --pretrained to start from weights)")
        done = int(resume_obj["epoch"]) + 1
        if done >= args.epochs:
            raise UserError(f"--resume {args.resume}: that run has finished {done} epoch(s) "
                            f"and --epochs is {args.epochs}, so there is nothing to train; "
                            f"pass a larger --epochs to continue it")

    # a temporary model only to read its data config (mean/std, interpolation)
    probe_cfg = None
    if args.dataset in ("imagefolder", "shards"):
        probe = create(args.model, num_classes=args.num_classes or 2, in_chans=args.in_chans or 3,
                       **_model_kwargs(args))
        probe_cfg = data_config(probe)
        del probe
    train_loader, val_loader, class_names, in_chans = build_train_data(args, dist, probe_cfg or
                                                                       data_config(None))
    num_classes = args.num_classes or len(class_names)
    if args.dataset == "fashion-mnist":
        from ..data import fashion_mnist as fm
        norm = (list(fm.MEAN * in_chans), list(fm.STD * in_chans))
    else:
        norm = (list(probe_cfg["mean"][:in_chans]), list(probe_cfg["std"][:in_chans]))
    if args.num_classes and args.num_classes < len(class_names):
        raise UserError(f"--num-classes {args.num_classes} is less than the {len(class_names)} "
                        f"classes in the data")
    if resume_obj is not None:
        if resume_obj["model_name"] != args.model or int(resume_obj["num_classes"]) != num_classes:
            raise UserError(
                f"cannot resume from {args.resume}: it holds model '{resume_obj['model_name']}' "
                f"with {resume_obj['num_classes']} classes, but this run is '{args.model}' with "
                f"{num_classes} classes")

    seed_all(args.seed)  # identical initial weights on every rank and across runs
    model = create(args.model, num_classes=num_classes, in_chans=in_chans,
                   drop_path=args.drop_path, **_model_kwargs(args))
    if args.pretrained and resume_obj is None:
        load_pretrained(model, args.pretrained)
    model.to(device)
    seed_all(args.seed + dist.rank)

    opt_kwargs = {}
    if args.opt in ("sgd", "momentum", "nesterov"):
        opt_kwargs["momentum"] = args.momentum
    optimizer = __import__("timm.optim", fromlist=["x"]).create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **opt_kwargs)
    accum = max(1, args.accum_steps)
    updates_per_epoch = max(1, math.ceil(len(train_loader) / accum))
    scheduler = _scheduler(args, optimizer, updates_per_epoch)
    scaler = None
    if args.amp == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_decay)

    start_epoch, step, best = 0, 0, -1.0
    if resume_obj is not None:
        model.load_state_dict(resume_obj["model"])
        optimizer.load_state_dict(resume_obj["optimizer"])
        if resume_obj.get("scheduler") is not None:
            scheduler.load_state_dict(resume_obj["scheduler"])
        if scaler is not None and resume_obj.get("scaler"):
            scaler.load_state_dict(resume_obj["scaler"])
        if ema is not None and resume_obj.get("model_ema") is not None:
            unwrap(ema.module).load_state_dict(resume_obj["model_ema"])
        start_epoch = int(resume_obj["epoch"]) + 1
        step = int(resume_obj["step"])
        best = float(resume_obj.get("best_top1", -1.0))
        rngs = resume_obj.get("rng") or []
        if rngs:
            ckpt.set_rng_state(rngs[dist.rank % len(rngs)])
        if main:
            log.info("resumed from %s at epoch %d (step %d)", args.resume, start_epoch, step)
        del resume_obj

    net, average, val_net = model, None, model
    compile_mode = getattr(args, "compile_mode", None)
    if getattr(args, "cuda_graphs", False):
        # the eager step is host-bound (docs/dense_speed.md); graphs replay it without the host.
        # Validation too: a graph for its full batches and one for the last, smaller one
        net = val_net = GraphedForward(model, max_infer_graphs=2)
        if dist.distributed:  # not DDP: the recording must not meet DDP's hooks
            average = GradientAverager(model)
    elif args.compile or compile_mode:
        # reduce-overhead: CUDA graphs; the eager and default-mode steps are host-bound.
        net = compile_model(model, args.compile or "model", compile_mode)
    if dist.distributed and average is None:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                         num_classes=num_classes)
        from timm.loss import SoftTargetCrossEntropy
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    mlog = MetricLog(out, enabled=main, tensorboard=not args.no_tensorboard)
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM params, %d classes, in_chans %d, input %d; %d train samples "
                 "per rank x %d ranks; device %s", args.model, n_params / 1e6, num_classes,
                 in_chans, args.input_size, train_loader.num_samples, dist.world_size, device)
    summary = {"best_top1": best, "epochs": args.epochs, "output": str(out)}
    epoch = start_epoch - 1
    stop_after = args.stop_after_epochs
    budget = None
    probe = None
    threads = getattr(args, "threads", None)
    if threads and threads != "auto":
        torch.set_num_threads(int(threads))
    elif threads == "auto" and device.type == "cpu":
        probe = ThreadProbe(len(train_loader), dist)
    if getattr(args, "time_budget", None) and start_epoch == 0:
        budget = TimeBudget(args, optimizer, updates_per_epoch, len(train_loader),
                            val_loader is not None, dist)
    epoch = start_epoch
    try:
        while epoch < args.epochs:
            t0 = time.time()
            train_loader.set_epoch(epoch)
            tr, step, new_sched = _train_epoch(args, net, model, train_loader, optimizer,
                                               scheduler, scaler, ema, mixup_fn, criterion, epoch,
                                               step, dist, budget, probe, average)
            scheduler = new_sched or scheduler
            row = {"epoch": epoch, "step": step, **{f"train_{k}": v for k, v in tr.items()}}
            if val_loader is not None and ((epoch + 1) % args.eval_interval == 0
                                           or epoch + 1 == args.epochs):
                ev = evaluate(val_net, val_loader, device, amp=args.amp,
                              progress=main and args.progress,
                              desc=f"eval {epoch}")
                row.update({f"val_{k}": v for k, v in ev.items()})
                if ema is not None:
                    ee = evaluate(ema.module, val_loader, device, amp=args.amp)
                    row.update({f"val_ema_{k}": v for k, v in ee.items()})
            row["epoch_time"] = time.time() - t0
            row["threads"] = torch.get_num_threads()
            top1 = row.get("val_top1", -1.0)
            is_best = top1 > best
            best = max(best, top1)
            rng_all = all_gather_object(ckpt.rng_state())
            if main:
                state = _state(args, model, optimizer, scheduler, scaler, ema, epoch, step,
                               best, num_classes, class_names, in_chans, rng_all, row, norm)
                ckpt.save_atomic(state, out / "last.pth")
                if is_best:
                    ckpt.save_atomic(state, out / "best.pth")
                mlog.log(row)
                msg = f"epoch {epoch + 1}/{args.epochs}: train loss {tr['loss']:.4f}"
                if "val_top1" in row:
                    msg += (f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% "
                            f"loss {row['val_loss']:.4f}")
                msg += f", {row['epoch_time']:.1f}s"
                print(msg, flush=True)
            summary.update(row)
            barrier()
            epoch += 1
            if budget is not None:
                scheduler = budget.after_epoch(epoch - start_epoch, step) or scheduler
            if stop_after and epoch - start_epoch >= stop_after:
                break
    except KeyboardInterrupt:
        if main:
            last = out / "last.pth"
            print(f"\ninterrupted during epoch {epoch + 1}; "
                  + (f"resume with --resume {last}" if last.exists() else "no checkpoint yet"),
                  file=sys.stderr, flush=True)
        raise
    finally:
        mlog.close()
    if isinstance(net, GraphedForward) and main:
        log.info(graph_summary(net))
    summary["best_top1"] = best
    summary["checkpoint"] = str(out / "last.pth")
    return summary


def _scheduler(args, optimizer, updates_per_epoch):
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    return scheduler


class TimeBudget:
    """--time-budget: after a few timed batches of the first epoch, choose the number
    of epochs (at most --epochs) that fits the budget and rebuild the LR schedule for
    it. Rank 0 decides; the choice is broadcast so every rank agrees."""

    def __init__(self, args, optimizer, updates_per_epoch, n_batches, has_val, dist):
        self.args, self.optimizer = args, optimizer
        self.updates_per_epoch, self.n_batches = updates_per_epoch, n_batches
        self.has_val, self.dist = has_val, dist
        self.t0 = time.time()
        self.warm = min(10, max(1, n_batches // 20))
        self.probe = min(n_batches - 1, self.warm + max(20, n_batches // 25))
        self.t_warm = None
        self.done = False

    def after_batch(self, i: int, step: int):
        """Returns a new scheduler when the epoch count was decided at this batch."""
        if self.done or i + 1 < self.warm:
            return None
        if self.t_warm is None:
            self.t_warm, self.i_warm = time.time(), i
            return None
        if i - self.i_warm < self.probe - self.warm:
            return None
        self.done = True
        per_batch = (time.time() - self.t_warm) / (i - self.i_warm)
        epoch_s = per_batch * self.n_batches
        # evaluation: roughly 8% of an epoch's training time (a tenth of the images,
        # forward only); after every epoch, or only after the last one
        eval_s = 0.08 * epoch_s if self.has_val else 0.0
        every = self.args.eval_interval == 1
        left = self.args.time_budget - (time.time() - self.t0)
        from .distributed import broadcast_object
        epochs = int((left + per_batch * (i + 1) - (0.0 if every else eval_s))
                     // (epoch_s + (eval_s if every else 0.0)))
        epochs = broadcast_object(max(1, min(self.args.epochs, epochs)))
        if self.dist.is_main:
            log.info("time budget %.0fs: %.1fs per epoch measured -> %d epoch(s)",
                     self.args.time_budget, epoch_s, epochs)
        self.args.epochs = epochs
        sched = _scheduler(self.args, self.optimizer, self.updates_per_epoch)
        sched.step_update(num_updates=step)
        return sched


    def after_epoch(self, epochs_done: int, step: int):
        """If the measured pace no longer fits the budget (the machine got slower), cut
        the remaining epochs and rebuild the schedule; never adds epochs."""
        if not self.done or epochs_done >= self.args.epochs:
            return None
        elapsed = time.time() - self.t0
        per_epoch = elapsed / epochs_done
        fit = epochs_done + int(max(0.0, self.args.time_budget - elapsed) // per_epoch)
        from .distributed import broadcast_object
        fit = broadcast_object(max(epochs_done + 1, fit))
        if fit >= self.args.epochs:
            return None
        if self.dist.is_main:
            log.warning("time budget: the run slowed down (%.0fs per epoch); stopping after "
                        "%d epochs instead of %d", per_epoch, fit, self.args.epochs)
        self.args.epochs = fit
        sched = _scheduler(self.args, self.optimizer, self.updates_per_epoch)
        sched.step_update(num_updates=step)
        return sched


class ThreadProbe:
    """--threads auto on CPU: time a few batches with all intra-op threads, then a few
    with one, keep the faster. On a shared or oversubscribed machine one thread can be
    several times faster than two (OpenMP barriers wait on a busy core). ``many``: the
    thread count to try (default: the current one); ``start``: the batch (1 or more)
    the timing begins after (default: a few batches in, past the first-call costs)."""

    def __init__(self, n_batches: int, dist, many: int | None = None, start: int | None = None):
        self.many = many or torch.get_num_threads()
        self.start = start if start is not None else min(8, max(1, n_batches // 20))
        self.k = 6
        self.times: list[float] = []
        self.t = None
        self.done = self.many <= 1 or n_batches < self.start + 2 * self.k + 1
        self.dist = dist

    def after_batch(self, i: int) -> None:
        if self.done:
            return
        j = i + 1 - self.start
        if j == 0 or j == self.k:
            if self.t is not None:
                self.times.append(time.time() - self.t)
            torch.set_num_threads(self.many if j == 0 else 1)
            self.t = time.time()
        elif j == 2 * self.k:
            self.times.append(time.time() - self.t)
            from .distributed import broadcast_object
            n = broadcast_object(1 if self.times[1] < self.times[0] else self.many)
            torch.set_num_threads(n)
            self.done = True
            if self.dist.is_main:
                log.info("threads: %d batches took %.2fs with %d threads, %.2fs with 1 -> %d",
                         self.k, self.times[0], self.many, self.times[1], n)


def _model_kwargs(args) -> dict:
    kw = {}
    for key in ("pretrain_size", "fixed_pool_size", "img_size"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    return kw


def _state(args, model, optimizer, scheduler, scaler, ema, epoch, step, best, num_classes,
           class_names, in_chans, rng_all, row, norm) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        "model_ema": unwrap(ema.module).state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "best_top1": best,
        "rng": rng_all,
        "model_name": args.model,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "input_size": args.input_size,
        "class_names": list(class_names),
        "mean": [float(v) for v in norm[0]],
        "std": [float(v) for v in norm[1]],
        "dataset": args.dataset,
        "args": ckpt.primitives(vars(args)),
        "metrics": ckpt.primitives(row),
    }


def _train_epoch(args, net, model, loader, optimizer, scheduler, scaler, ema, mixup_fn,
                 criterion, epoch, step, dist, budget=None, probe=None, average=None):
    device = dist.device
    net.train()
    accum = max(1, args.accum_steps)
    n_batches = len(loader)
    bar = None
    if dist.is_main and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0, leave=False)
    new_sched = None
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    t_start = time.time()
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        target = y
        if mixup_fn is not None:
            x, target = mixup_fn(x, y)
        last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
        sync = contextlib_nullcontext() if last_micro or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast(device, args.amp):
                out = net(x)
                loss = criterion(out.float(), target)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                                f"lower --lr or use --clip-grad / --amp none")
            scaled = loss / accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        sums += torch.stack([loss.detach().double() * len(y),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        seen += len(y)
        if not last_micro:
            continue
        if average is not None:  # --cuda-graphs under torchrun: no DDP (GradientAverager)
            average()
        if args.debug_first_step and step == 0:
            _dump_first_step(args, net, loss, len(y), dist)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        scheduler.step_update(num_updates=step)
        if probe is not None:
            probe.after_batch(i)
        if budget is not None and (probe is None or probe.done):
            new = budget.after_batch(i, step)
            if new is not None:
                scheduler = new_sched = new
                if bar is not None:
                    bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
        if ema is not None:
            ema.update(model, step=step)
        if bar is not None:
            el = time.time() - t_start
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen * dist.world_size / max(el, 1e-9):.0f}", refresh=False)
            bar.update(accum if (i + 1) % accum == 0 else (i + 1) % accum)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    el = time.time() - t_start
    all_reduce_sum(sums)
    total_loss, n = sums.tolist()
    return {"loss": total_loss / max(n, 1), "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": n / max(el, 1e-9), "time": el}, step, new_sched


class contextlib_nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _dump_first_step(args, net, loss, n, dist) -> None:
    """Test hook: the first update's global mean loss and (already all-reduced) grads."""
    t = torch.tensor([loss.detach().double().item() * n, float(n)], dtype=torch.float64,
                     device=dist.device)
    all_reduce_sum(t)
    if dist.is_main:
        torch.save({"loss": t[0].item() / t[1].item(), "count": int(t[1].item()),
                    "grads": _grads(net)}, args.debug_first_step)
