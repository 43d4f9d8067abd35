"""`transnext seg train|eval|predict|convert|make-mosaics`: argument parsing only."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ...cli_checks import (add_compile_flags, below_one, device_name, non_negative_float,
                           non_negative_int, positive_float, positive_int)
from ..common.cli_flags import add_run_flags
from .recipes import RECIPES

log = logging.getLogger("transnext.seg")


def _model_flags(a) -> None:
    a("--pos-bias", default=None, choices=["interpolate", "extrapolate"],
      help="backbone position-bias mode (released UperNets: interpolate at 512; "
           "extrapolate for the extrapolation rows)")
    a("--img-size", type=positive_int, default=None,
      help="interpolate mode: the size the bias is built at (default: the crop size)")


def _infer_flags(a) -> None:
    a("--mode", default=None, choices=["whole", "slide"], help="whole image or sliding window")
    a("--crop-size", type=positive_int, default=None, help="sliding window size (default 512)")
    a("--stride", type=positive_int, default=None, help="sliding window stride (default 341)")
    a("--scales", type=positive_float, nargs="+", default=None,
      help="multi-scale test ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (softmax averaged)")
    a("--flip", action="store_true", help="also the horizontally flipped image")
    a("--test-scale", type=positive_int, nargs=2, default=None, metavar=("LONG", "SHORT"),
      help="keep-ratio rescale before inference, e.g. 2048 512 (ADE20K)")
    a("--fixed-pool-size", type=positive_int, default=None, help="linear inference mode")
    a("--device", type=device_name, default=None)
    a("--amp", default="none", choices=["bf16", "fp16", "none"])
    a("--threads", type=positive_int, default=None, help="CPU intra-op threads")
    a("--cuda-graphs", action="store_true",
      help="replay the backbone's forward from CUDA graphs, one per window (or image) "
           "shape (up to 48, sharing one memory pool; other shapes run eagerly; GPU only)")


def add_parser(sub) -> None:
    p = sub.add_parser("seg", help="semantic segmentation (UperNet, Mask2Former on TransNeXt)",
                       description="Semantic segmentation: train, evaluate, predict, convert "
                                   "released checkpoints, build the Fashion-MNIST mosaic set.")
    ss = p.add_subparsers(dest="seg_command", required=True,
                          metavar="{train,eval,predict,convert,make-mosaics}")

    t = ss.add_parser("train", help="train a segmenter (iteration-based)")
    a = t.add_argument
    a("--head", default=None, choices=["upernet", "mask2former"])
    a("--model", default=None, help="TransNeXt variant, e.g. transnext_tiny")
    a("--recipe", default=None, choices=sorted(RECIPES))
    a("--data-dir", default=None)
    a("--dataset", default=None, choices=["folder", "ade20k"])
    a("--output", default=None, help="folder for checkpoints and logs")
    a("--iters", type=positive_int, default=None)
    a("--batch-size", type=positive_int, default=None, help="per process")
    a("--crop-size", type=positive_int, default=None)
    a("--scale", type=positive_int, nargs=2, default=None, metavar=("LONG", "SHORT"),
      help="random-rescale base size (ratio 0.5-2.0 of it; default 4*crop x crop)")
    a("--ratio-range", type=positive_float, nargs=2, default=None, metavar=("MIN", "MAX"),
      help="random-rescale ratio range (default 0.5 2.0)")
    a("--lr", type=positive_float, default=None)
    a("--weight-decay", type=non_negative_float, default=None)
    a("--warmup-iters", type=non_negative_int, default=None)
    a("--power", type=positive_float, default=None, help="poly schedule power")
    a("--backbone-lr-mult", type=positive_float, default=None)
    a("--clip-grad", type=positive_float, default=None, help="max gradient norm")
    a("--drop-path", type=below_one, default=None)
    a("--pretrain-size", type=positive_int, default=None)
    a("--channels", type=positive_int, default=None, help="UPerHead width (released: 512)")
    a("--aux-channels", type=positive_int, default=None, help="auxiliary head width (256)")
    a("--time-budget", type=non_negative_float, default=None, metavar="SECONDS",
      help="fit training + the final evaluation into this wall time: --iters becomes a "
           "maximum and the schedule follows the clock (0: off; not exactly resumable)")
    a("--pretrained", default=None, metavar="PATH",
      help="ImageNet backbone weights, or a released/own UperNet checkpoint")
    a("--resume", default=None, metavar="PATH", help="continue from a last.pth exactly")
    a("--device", type=device_name, default=None)
    a("--amp", default=None, choices=["bf16", "fp16", "none"])
    add_compile_flags(a)
    a("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: 'eager'
    a("--mode", default=None, choices=["whole", "slide"], help="evaluation inference")
    a("--test-scale", type=positive_int, nargs=2, default=None, metavar=("LONG", "SHORT"))
    a("--eval-interval", type=positive_int, default=None)
    a("--ckpt-interval", type=positive_int, default=None)
    add_run_flags(a)
    _model_flags(a)
    t.set_defaults(func=_run_train)

    e = ss.add_parser("eval", help="mIoU / mAcc / aAcc on a dataset's val split")
    a = e.add_argument
    a("--checkpoint", required=True, help="seg train checkpoint, converted folder or released .pth")
    a("--model", default=None, help="expected TransNeXt variant (checked)")
    a("--data-dir", required=True)
    a("--dataset", default="folder", choices=["folder", "ade20k"])
    a("--batch-size", type=positive_int, default=1)
    a("--workers", type=non_negative_int, default=2)
    a("--json", default=None, metavar="PATH")
    a("--no-verify", action="store_true")
    _infer_flags(a)
    _model_flags(a)
    e.set_defaults(func=_run_eval)

    pr = ss.add_parser("predict", help="label maps and colour overlays for images")
    a = pr.add_argument
    a("images", nargs="+", metavar="IMAGE")
    a("--checkpoint", required=True)
    a("--model", default=None)
    a("--output", required=True, help="folder for <name>_labels.png and <name>_overlay.png")
    _infer_flags(a)
    _model_flags(a)
    pr.set_defaults(func=_run_predict)

    c = ss.add_parser("convert", help="a released (or own) checkpoint -> safetensors + config")
    a = c.add_argument
    a("checkpoint", help="e.g. upernet_transnext_tiny_512x512_160k_ade20k_in1k.pth")
    a("--output", required=True, help="folder for model.safetensors + config.json")
    a("--model", default=None, help="expected TransNeXt variant (checked)")
    _model_flags(a)
    c.set_defaults(func=_run_convert)

    m = ss.add_parser("make-mosaics", help="write the Fashion-MNIST mosaic segmentation set")
    a = m.add_argument
    a("--output", required=True)
    a("--train", type=positive_int, default=16000, help="training mosaics (train split items)")
    a("--val", type=positive_int, default=500, help="held-out mosaics (test split items)")
    a("--size", type=positive_int, default=64, help="canvas side in pixels")
    a("--seed", type=non_negative_int, default=0)
    a("--fashion-mnist-dir", default=None, help="idx files (default: Debian's location)")
    m.set_defaults(func=_run_mosaics)


def _require_transformers() -> None:
    """transformers missing or too old: one line, not a traceback."""
    from ...engine.errors import UserError
    try:
        from ..common import backbone  # noqa: F401
    except ImportError as e:
        msg = str(e) if "transnext" in str(e) else (
            f"{e}: the segmentation jobs need transformers (pip install 'transnext[dense]')")
        raise UserError(msg) from None


def _device(args):
    from ...engine.distributed import resolve_device
    import torch
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def _infer_kwargs(args, model=None) -> dict:
    """Inference settings from the flags; those not given follow the evaluation of the
    ``seg train`` run that wrote the checkpoint (its mode, window and test scale, kept in
    the config by ``convert`` too), so ``seg eval`` repeats the number training printed."""
    from .evaluate import inference_settings
    return dict(scales=tuple(args.scales or (1.0,)), flip=args.flip,
                **inference_settings(model, mode=args.mode, crop=args.crop_size,
                                     stride=args.stride, test_scale=args.test_scale))


def _load(args, device):
    from .evaluate import backbone_of, load_model
    if args.cuda_graphs:
        from ...engine.cuda_graphs import check_cuda_graphs
        check_cuda_graphs(device)
    model = load_model(args.checkpoint, args.model, pos_bias=args.pos_bias,
                       img_size=args.img_size or 512)
    if getattr(args, "fixed_pool_size", None):
        backbone_of(model).set_fixed_pool_size(args.fixed_pool_size)
    if args.cuda_graphs:  # inference only
        from ...engine.cuda_graphs import INFER_GRAPHS
        backbone_of(model).use_cuda_graphs(train=False, infer=True,
                                           max_infer_graphs=INFER_GRAPHS)
    from ...ops.cpu_linear import pack_on_cpu
    return pack_on_cpu(model.to(device), device)  # fp32 CPU products from packed weights


def _run_train(args):
    _require_transformers()
    from .train import train
    summary = train(args)
    if args.json:
        from pathlib import Path
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


def _run_eval(args):
    _require_transformers()
    from ...engine.distributed import cleanup, init_distributed
    from .data import EvalTransform, SegDataset
    from .evaluate import evaluate
    from .metrics import format_table
    dist = init_distributed(args.device)
    try:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        model = _load(args, dist.device)
        ds = SegDataset(args.data_dir, args.dataset, "val", transform=EvalTransform(None),
                        verify=not args.no_verify)
        if ds.num_classes != model.config.num_labels:
            from ...engine.errors import UserError
            raise UserError(f"the model predicts {model.config.num_labels} classes but "
                            f"{args.data_dir} has {ds.num_classes}")
        kw = _infer_kwargs(args, model)
        res = evaluate(model, ds, dist.device, rank=dist.rank, world_size=dist.world_size,
                       amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                       progress=dist.is_main and sys.stderr.isatty(), **kw)
        if dist.is_main:
            print(format_table(res), flush=True)
            if args.cuda_graphs:  # rank 0's count
                print(_graphs_line(model), flush=True)
            if args.json:
                from pathlib import Path
                Path(args.json).write_text(json.dumps({**res, "inference": kw, "images": len(ds)},
                                                      indent=1, default=str))
    finally:
        cleanup()


def _run_predict(args):
    _require_transformers()
    from .evaluate import predict_files
    device = _device(args)
    model = _load(args, device)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for r in predict_files(model, args.images, args.output, device, class_names=names,
                           amp=args.amp, **_infer_kwargs(args, model)):
        print(f"{r['image']}: {r['overlay']} ({', '.join(r['classes'])})", flush=True)
    if args.cuda_graphs:
        print(_graphs_line(model), flush=True)


def _graphs_line(model) -> str:
    from ...engine.cuda_graphs import summary
    from .evaluate import backbone_of
    return summary(backbone_of(model).graphed)


def _run_convert(args):
    _require_transformers()
    import shutil
    import tempfile
    from pathlib import Path
    from .evaluate import load_model
    model = load_model(args.checkpoint, args.model, pos_bias=args.pos_bias,
                       img_size=args.img_size or 512)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/model.safetensors and config.json ({type(model).__name__} on "
          f"{model.config.backbone_config.model_name}, {model.config.num_labels} classes, "
          f"{model.config.backbone_config.pos_bias} bias)", flush=True)


def _run_mosaics(args):
    from ..common.mosaic import write_mosaic_set
    out = write_mosaic_set(args.output, args.train, args.val, size=args.size, seed=args.seed,
                           data_dir=args.fashion_mnist_dir)
    print(f"wrote {args.train} training and {args.val} held-out mosaics to {out}", flush=True)
