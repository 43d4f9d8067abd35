"""`transnext <subcommand>`: arguments and their checks; the work lives in engine/ and tools/."""
from __future__ import annotations

import argparse
import linecache
import logging
import sys
import traceback
from pathlib import Path

from .cli_checks import (UsageError, add_compile_flags, arch_name, below_one, device_name,
                         existing_dir, existing_file, flag, model_name, non_negative_float,
                         non_negative_int, output_file, positive_float, positive_int,
                         probability, threads_value, writable_dir)
from .engine.recipes import RECIPES
from .tools.parsers import add_tool_parsers

ROBUSTNESS_SETS = ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2", "imagenet-c")
# timm schedulers the training loop can drive (plateau needs a metric per step; none
# leaves no schedule to step)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a classifier",
                       description="Train a model. Flags left unset come from --recipe, then "
                                   "from built-in defaults; any flag overrides the recipe.")
    a = p.add_argument
    a("--model", default=None, type=model_name, help="timm model name, e.g. transnext_tiny")
    a("--recipe", default=None, choices=sorted(RECIPES), help="named preset (SPEC section 8)")
    a("--dataset", default=None, choices=["imagefolder", "fashion-mnist", "shards"],
      help="shards: webdataset-style tar files in DIR/train and DIR/val "
           "(<key>.jpg|png + <key>.cls)")
    a("--data-dir", default=None, type=existing_dir,
      help="ImageFolder root with train/ and val/, or the Fashion-MNIST idx folder")
    a("--output", default=None, help="folder for checkpoints and logs")
    a("--epochs", type=positive_int, default=None)
    a("--batch-size", type=positive_int, default=None, help="per process")
    a("--eval-batch-size", type=positive_int, default=None)
    a("--input-size", type=positive_int, default=None)
    a("--in-chans", type=positive_int, default=None)
    a("--num-classes", type=positive_int, default=None, help="default: number of class folders")
    a("--pretrained", default=None, type=existing_file, metavar="PATH", help="start from these weights (fine-tune)")
    a("--resume", default=None, type=existing_file, metavar="PATH", help="continue a run from its last.pth")
    a("--device", default=None, type=device_name,
      help="cpu | cuda | cuda:N (default: cuda if available)")
    a("--amp", default=None, choices=["bf16", "fp16", "none"])
    add_compile_flags(a)
    a("--accum-steps", type=positive_int, default=None, help="gradient accumulation steps")
    a("--opt", default=None, help="timm optimizer name (adamw, sgd, lamb, ...)")
    a("--lr", type=positive_float, default=None)
    a("--weight-decay", type=non_negative_float, default=None)
    a("--momentum", type=below_one, default=None, help="SGD momentum (--opt sgd)")
    a("--sched", default=None, help="timm scheduler name (cosine, step, constant, ...)")
    a("--min-lr", type=non_negative_float, default=None)
    a("--warmup-epochs", type=non_negative_int, default=None)
    a("--warmup-lr", type=non_negative_float, default=None)
    a("--clip-grad", type=non_negative_float, default=None, help="max gradient norm (0 = off)")
    a("--drop-path", type=below_one, default=None, help="stochastic depth rate")
    a("--smoothing", type=below_one, default=None, help="label smoothing")
    a("--mixup", type=non_negative_float, default=None, help="mixup alpha (0 = off)")
    a("--cutmix", type=non_negative_float, default=None, help="cutmix alpha (0 = off)")
    a("--mixup-prob", type=probability, default=None)
    a("--mixup-switch-prob", type=probability, default=None)
    a("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    a("--color-jitter", type=non_negative_float, default=None)
    a("--reprob", type=probability, default=None, help="random erasing probability")
    a("--hflip", type=probability, default=None)
    a("--scale-min", type=probability, default=None, help="RandomResizedCrop minimum scale")
    a("--train-aug", default=None, choices=["timm", "none"], help="'none': eval transform for "
                                                                 "training (tests)")
    a("--repeated-aug", default=None, action=argparse.BooleanOptionalAction)
    a("--ema", default=None, action=argparse.BooleanOptionalAction)
    a("--ema-decay", type=below_one, default=None)
    a("--seed", type=non_negative_int, default=None)
    a("--workers", type=non_negative_int, default=None)
    a("--threads", default=None, type=threads_value, help="CPU intra-op threads: N, or 'auto' (measure N vs 1 "
                                      "early in epoch 1 and keep the faster)")
    a("--time-budget", type=positive_float, default=None, metavar="SECONDS",
      help="fit training into this wall time: --epochs becomes a maximum, the number of "
           "epochs is chosen from the speed measured early in epoch 1")
    a("--eval-interval", type=positive_int, default=None, help="evaluate every N epochs")
    a("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    a("--pretrain-size", type=positive_int, default=None, help="model option (TransNeXt)")
    a("--fixed-pool-size", type=positive_int, default=None, help="model option (TransNeXt)")
    a("--img-size", type=positive_int, default=None, help=argparse.SUPPRESS)  # interpolate mode only
    a("--no-verify", action="store_true", help="skip the up-front image check (large sets)")
    a("--no-tensorboard", action="store_true")
    a("--no-progress", dest="progress", action="store_false")
    a("--limit-train", type=positive_int, default=None, help=argparse.SUPPRESS)
    a("--limit-val", type=positive_int, default=None, help=argparse.SUPPRESS)
    a("--stop-after-epochs", type=positive_int, default=None, help=argparse.SUPPRESS)
    a("--debug-first-step", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train, check=_check_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (multi-resolution, linear mode, "
                                    "robustness suite)")
    a = p.add_argument
    a("--model", required=True, type=model_name)
    a("--checkpoint", default=None, type=existing_file,
      help="trained or published weights (.pth/.safetensors); required")
    a("--data-dir", default=None, type=existing_dir, help="ImageFolder (its val/ if present) or Fashion-MNIST folder")
    a("--dataset", default="imagefolder", choices=["imagefolder", "fashion-mnist", "shards"])
    a("--input-size", type=positive_int, nargs="+", default=None, help="one or more sizes")
    a("--fixed-pool-size", type=positive_int, default=None, help="linear inference mode pool size")
    a("--both-modes", action="store_true", help="with --fixed-pool-size: also the default mode")
    a("--batch-size", type=positive_int, default=64)
    a("--workers", type=non_negative_int, default=2)
    a("--device", default=None, type=device_name)
    a("--amp", default="none", choices=["bf16", "fp16", "none"])
    a("--threads", type=positive_int, default=None, help="CPU intra-op threads")
    a("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    a("--num-classes", type=positive_int, default=None)
    a("--in-chans", type=positive_int, default=None)
    a("--pretrain-size", type=positive_int, default=None)
    a("--suite", default=None, choices=["robustness"])
    for name in ROBUSTNESS_SETS:
        a(f"--{name}", default=None, type=existing_dir, metavar="DIR")
    a("--json", default=None, type=output_file, metavar="PATH", help="write the results here")
    a("--no-verify", action="store_true")
    a("--limit", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_eval, check=_check_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files")
    a = p.add_argument
    a("images", nargs="+", metavar="IMAGE")
    a("--model", required=True, type=model_name)
    a("--checkpoint", default=None, type=existing_file, help="trained weights; required")
    a("--topk", type=positive_int, default=5)
    a("--input-size", type=positive_int, default=None)
    a("--device", default=None, type=device_name)
    a("--json", default=None, type=output_file, metavar="PATH")
    a("--threads", type=positive_int, default=None, help="CPU intra-op threads")
    p.set_defaults(func=_run_predict, check=_check_predict)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and FLOPs of the model family")
    p.add_argument("names", nargs="*", metavar="MODEL", type=arch_name,
                   help="default: every variant")
    p.add_argument("--input-size", type=positive_int, default=None)
    p.add_argument("--json", default=None, type=output_file, metavar="PATH")
    p.set_defaults(func=_run_info)


def _check_train(args) -> None:
    from .engine import recipes
    given = {k for k, v in vars(args).items() if v is not None and v is not False}

    def set_by_user(*names):  # recipes and defaults fill the rest
        return [n for n in names if n in given]

    recipes.resolve(args)
    if not args.model:
        raise UsageError("--model is required (or a --recipe that names one)")
    try:
        model_name(args.model)  # a recipe's model, checked like the flag
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--model: {e}") from None
    if not args.output:
        raise UsageError("--output is required")
    why = writable_dir(args.output)
    if why:
        raise UsageError(f"--output {args.output}: {why}")
    if args.dataset in ("imagefolder", "shards") and not args.data_dir:
        raise UsageError(f"--data-dir is required for --dataset {args.dataset}")
    if args.dataset != "fashion-mnist" and args.in_chans not in (None, 1, 3):
        raise UsageError(f"--in-chans {args.in_chans}: images are read as grayscale (1) or "
                         f"RGB (3); other channel counts need --dataset fashion-mnist")
    if args.resume and args.pretrained:
        raise UsageError("--resume restores the run's own weights; drop --pretrained")
    if args.resume and set_by_user("time_budget"):
        raise UsageError("--time-budget sets the epoch count of a new run; a resumed run "
                         "keeps its schedule (drop --time-budget, or raise --epochs)")
    if args.img_size is not None:
        raise UsageError("--img-size only sets interpolate mode's bias size, which training "
                         "does not use")
    if args.sched not in SCHEDULERS:
        raise UsageError(f"--sched {args.sched!r}: choose from {', '.join(SCHEDULERS)}")
    import timm.optim
    known = timm.optim.list_optimizers()
    if args.opt.lower() not in known:
        raise UsageError(f"--opt {args.opt!r}: not a timm optimizer; e.g. adamw, sgd, lamb, "
                         f"lion (timm.optim.list_optimizers() lists {len(known)})")
    unused = []
    if args.opt not in ("sgd", "momentum", "nesterov"):
        unused += [(n, f"with --opt {args.opt}") for n in set_by_user("momentum")]
    if not args.ema:
        unused += [(n, "without --ema") for n in set_by_user("ema_decay")]
    if not (args.mixup > 0 or args.cutmix > 0):
        unused += [(n, "without --mixup or --cutmix") for n in
                   set_by_user("mixup_prob", "mixup_switch_prob")]
    if not args.warmup_epochs:
        unused += [(n, "without --warmup-epochs") for n in set_by_user("warmup_lr")]
    if args.dataset == "fashion-mnist":
        unused += [(n, "with --dataset fashion-mnist (its augmentation is crop + flip)")
                   for n in set_by_user("aa", "color_jitter", "reprob", "scale_min",
                                   "no_verify", "workers", "repeated_aug")]
    elif args.train_aug == "none":
        unused += [(n, "with --train-aug none") for n in
                   set_by_user("aa", "color_jitter", "reprob", "scale_min", "hflip")]
    if unused:
        name, why = unused[0]
        raise UsageError(f"{flag(name)} has no effect {why}")
    if args.aa and args.dataset != "fashion-mnist" and args.train_aug != "none":
        from .data import train_transform
        try:
            train_transform(32, auto_augment=args.aa)
        except Exception as e:  # noqa: BLE001 - timm's parser raises several kinds
            raise UsageError(f"--aa {args.aa!r} is not a timm auto-augment policy "
                             f"(e.g. rand-m9-mstd0.5-inc1, augmix-m5, original): {e}") from None


def _check_eval(args) -> None:
    if not args.checkpoint:
        raise UsageError("--checkpoint is required: without one the model has random weights")
    if args.both_modes and args.fixed_pool_size is None:
        raise UsageError("--both-modes compares the default mode with linear mode: it needs "
                         "--fixed-pool-size")
    sets = [n for n in ROBUSTNESS_SETS if getattr(args, n.replace("-", "_"))]
    if args.suite == "robustness" and not sets:
        raise UsageError("--suite robustness needs at least one of "
                         + ", ".join("--" + n for n in ROBUSTNESS_SETS))
    if sets and args.suite != "robustness":
        raise UsageError(f"--{sets[0]} is only read with --suite robustness")
    if args.dataset != "fashion-mnist" and not args.data_dir and args.suite is None:
        raise UsageError("nothing to evaluate: pass --data-dir (or --dataset fashion-mnist) "
                         "or --suite robustness with its folders")
    if args.dataset != "fashion-mnist" and args.in_chans not in (None, 1, 3):
        raise UsageError(f"--in-chans {args.in_chans}: images are read as grayscale (1) or "
                         f"RGB (3)")


def _check_predict(args) -> None:
    if not args.checkpoint:
        raise UsageError("--checkpoint is required: without one the model has random weights "
                         "and its labels mean nothing")
    for image in args.images:
        p = Path(image)
        if p.is_dir():
            raise UsageError(f"{image} is a folder; pass image files (e.g. {p / '*.jpg'})")
        if not p.is_file():
            raise UsageError(f"image file not found: {image}")


def _run_train(args):
    from .engine.train import train
    train(args)


def _run_eval(args):
    from .tools.evaluate import run
    run(args)


def _run_predict(args):
    from .tools.predict import run
    run(args)


def _run_info(args):
    from .tools import info
    info.run(names=args.names or None, input_size=args.input_size, json_out=args.json)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage of `train` alone is ~30 lines)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="transnext", description="TransNeXt classification jobs")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{train,eval,predict,info,export,erf,attention-map,seg,det}")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_info(sub)
    add_tool_parsers(sub)  # export, erf, attention-map (tools/parsers.py)
    from .tasks.segmentation.cli import add_parser as _add_seg
    _add_seg(sub)
    from .tasks.detection.cli import add_parser as _add_det
    _add_det(sub)
    return p


_PACKAGE = Path(__file__).resolve().parent


def _on_purpose(e: BaseException) -> bool:
    """An error the package raises for bad input: its own error types, or a ValueError or
    RuntimeError from a `raise` statement in the package's code (the model's argument and
    input checks, the attention backend's). One from inside torch or timm, or from an op
    our code called, is a bug of ours and keeps its traceback."""
    from .data.fashion_mnist import DataError
    from .engine.errors import UserError
    from .models.checkpoint import CheckpointError
    if isinstance(e, (UserError, DataError, CheckpointError)):
        return True
    if type(e) not in (ValueError, RuntimeError) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename
    return (Path(path).resolve().is_relative_to(_PACKAGE)
            and linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise"))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


# optional dependencies -> the extra that installs them (pyproject.toml)
OPTIONAL_PACKAGES = {"pycocotools": "dense", "transformers": "dense", "scipy": "dense",
                     "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
                     "matplotlib": "viz"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    prog = f"transnext {args.command}"
    try:
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        extra = OPTIONAL_PACKAGES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"{prog}: error: this needs the optional package {e.name.split('.')[0]!r}: "
              f"pip install 'transnext-pytorch[{extra}]'", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - sorted into input errors and bugs below
        if not _on_purpose(e):
            traceback.print_exc()
            print(f"{prog}: internal error (a bug in transnext, not in your input): "
                  f"please report it with the command line and the traceback above",
                  file=sys.stderr, flush=True)
            return 1
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
