"""`transnext <subcommand>`: argument parsing only; the work lives in engine/ and tools/."""
from __future__ import annotations

import argparse
import logging
import sys

from .engine.recipes import RECIPES


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a classifier",
                       description="Train a model. Flags left unset come from --recipe, then "
                                   "from built-in defaults; any flag overrides the recipe.")
    a = p.add_argument
    a("--model", default=None, help="timm model name, e.g. transnext_tiny")
    a("--recipe", default=None, choices=sorted(RECIPES), help="named preset (SPEC section 8)")
    a("--dataset", default=None, choices=["imagefolder", "fashion-mnist", "shards"],
      help="shards: webdataset-style tar files in DIR/train and DIR/val "
           "(<key>.jpg|png + <key>.cls)")
    a("--data-dir", default=None, help="ImageFolder root with train/ and val/, or the "
                                       "Fashion-MNIST idx folder")
    a("--output", default=None, help="folder for checkpoints and logs")
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="per process")
    a("--eval-batch-size", type=int, default=None)
    a("--input-size", type=int, default=None)
    a("--in-chans", type=int, default=None)
    a("--num-classes", type=int, default=None, help="default: number of class folders")
    a("--pretrained", default=None, metavar="PATH", help="start from these weights (fine-tune)")
    a("--resume", default=None, metavar="PATH", help="continue a run from its last.pth")
    a("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    a("--amp", default=None, choices=["bf16", "fp16", "none"])
    a("--compile", action="store_true", help="torch.compile the model")
    a("--accum-steps", type=int, default=None, help="gradient accumulation steps")
    a("--opt", default=None, help="timm optimizer name (adamw, sgd, lamb, ...)")
    a("--lr", type=float, default=None)
    a("--weight-decay", type=float, default=None)
    a("--momentum", type=float, default=None)
    a("--sched", default=None, help="timm scheduler name (cosine, step, const, ...)")
    a("--min-lr", type=float, default=None)
    a("--warmup-epochs", type=int, default=None)
    a("--warmup-lr", type=float, default=None)
    a("--clip-grad", type=float, default=None, help="max gradient norm")
    a("--drop-path", type=float, default=None, help="stochastic depth rate")
    a("--smoothing", type=float, default=None, help="label smoothing")
    a("--mixup", type=float, default=None, help="mixup alpha (0 = off)")
    a("--cutmix", type=float, default=None, help="cutmix alpha (0 = off)")
    a("--mixup-prob", type=float, default=None)
    a("--mixup-switch-prob", type=float, default=None)
    a("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    a("--color-jitter", type=float, default=None)
    a("--reprob", type=float, default=None, help="random erasing probability")
    a("--hflip", type=float, default=None)
    a("--scale-min", type=float, default=None, help="RandomResizedCrop minimum scale")
    a("--train-aug", default=None, choices=["timm", "none"], help="'none': eval transform for "
                                                                 "training (tests)")
    a("--repeated-aug", default=None, action=argparse.BooleanOptionalAction)
    a("--ema", default=None, action=argparse.BooleanOptionalAction)
    a("--ema-decay", type=float, default=None)
    a("--seed", type=int, default=None)
    a("--workers", type=int, default=None)
    a("--threads", default=None, help="CPU intra-op threads: N, or 'auto' (measure N vs 1 "
                                      "early in epoch 1 and keep the faster)")
    a("--time-budget", type=float, default=None, metavar="SECONDS",
      help="fit training into this wall time: --epochs becomes a maximum, the number of "
           "epochs is chosen from the speed measured early in epoch 1")
    a("--eval-interval", type=int, default=None, help="evaluate every N epochs")
    a("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    a("--pretrain-size", type=int, default=None, help="model option (TransNeXt)")
    a("--fixed-pool-size", type=int, default=None, help="model option (TransNeXt)")
    a("--img-size", type=int, default=None, help="model option (TransNeXt interpolate mode)")
    a("--no-verify", action="store_true", help="skip the up-front image check (large sets)")
    a("--no-tensorboard", action="store_true")
    a("--no-progress", dest="progress", action="store_false")
    a("--limit-train", type=int, default=None, help=argparse.SUPPRESS)
    a("--limit-val", type=int, default=None, help=argparse.SUPPRESS)
    a("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)
    a("--debug-first-step", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (multi-resolution, linear mode, "
                                    "robustness suite)")
    a = p.add_argument
    a("--model", required=True)
    a("--checkpoint", default=None, help="trained or published weights (.pth/.safetensors)")
    a("--data-dir", default=None, help="ImageFolder (its val/ if present) or Fashion-MNIST folder")
    a("--dataset", default="imagefolder", choices=["imagefolder", "fashion-mnist", "shards"])
    a("--input-size", type=int, nargs="+", default=None, help="one or more sizes")
    a("--fixed-pool-size", type=int, default=None, help="linear inference mode pool size")
    a("--both-modes", action="store_true", help="with --fixed-pool-size: also the default mode")
    a("--batch-size", type=int, default=64)
    a("--workers", type=int, default=2)
    a("--device", default=None)
    a("--amp", default="none", choices=["bf16", "fp16", "none"])
    a("--threads", type=int, default=None, help="CPU intra-op threads")
    a("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    a("--num-classes", type=int, default=None)
    a("--in-chans", type=int, default=None)
    a("--pretrain-size", type=int, default=None)
    a("--suite", default=None, choices=["robustness"])
    a("--imagenet-a", default=None, metavar="DIR")
    a("--imagenet-r", default=None, metavar="DIR")
    a("--imagenet-sketch", default=None, metavar="DIR")
    a("--imagenet-v2", default=None, metavar="DIR")
    a("--imagenet-c", default=None, metavar="DIR")
    a("--json", default=None, metavar="PATH", help="write the results here")
    a("--no-verify", action="store_true")
    a("--limit", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files")
    a = p.add_argument
    a("images", nargs="+", metavar="IMAGE")
    a("--model", required=True)
    a("--checkpoint", default=None)
    a("--topk", type=int, default=5)
    a("--input-size", type=int, default=None)
    a("--device", default=None)
    a("--json", default=None, metavar="PATH")
    a("--threads", type=int, default=None, help="CPU intra-op threads")
    p.set_defaults(func=_run_predict)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and FLOPs of the model family")
    p.add_argument("names", nargs="*", metavar="MODEL")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--json", default=None, metavar="PATH")
    p.set_defaults(func=_run_info)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transnext", description="TransNeXt classification jobs")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,info,seg}")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_info(sub)
    from .tasks.segmentation.cli import add_parser as _add_seg
    _add_seg(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data.fashion_mnist import DataError
    from .engine.errors import UserError
    try:
        args.func(args)
    except (UserError, DataError) as e:
        print(f"transnext {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
