"""`transnext det train|eval|predict|convert|make-mosaics`: arguments and their checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ...cli_checks import (UsageError, arch_name, below_one, device_name, existing_dir,
                           existing_file, non_negative_float, non_negative_int, output_file,
                           positive_float, positive_int, probability, writable_dir)
from ..common.cli_flags import add_run_flags
from .recipes import ARCHS, RECIPES


def _data_flags(a, train: bool) -> None:
    a("--data-dir", default=None, type=existing_dir,
      help="COCO layout: {train,val}2017/ and annotations/instances_{train,val}2017.json")
    if train:
        a("--train-ann", default=None, type=existing_file, help="instances json (instead of "
                                                                "--data-dir)")
        a("--train-images", default=None, type=existing_dir)
    a("--val-ann", default=None, type=existing_file)
    a("--val-images", default=None, type=existing_dir)


def add_parser(sub) -> None:
    p = sub.add_parser("det", help="detection and instance segmentation (Mask R-CNN, DINO "
                                   "on TransNeXt)",
                       description="Object detection and instance segmentation: train, "
                                   "evaluate, predict, convert released checkpoints, build the "
                                   "Fashion-MNIST instance mosaics.")
    ss = p.add_subparsers(dest="det_command", required=True,
                          metavar="{train,eval,predict,convert,make-mosaics}")

    t = ss.add_parser("train", help="train a detector (epoch-based, mmdet's 1x schedule)")
    a = t.add_argument
    a("--arch", default=None, choices=list(ARCHS))
    a("--model", default=None, type=arch_name, help="TransNeXt variant, e.g. transnext_tiny")
    a("--recipe", default=None, choices=sorted(RECIPES))
    _data_flags(a, train=True)
    a("--output", default=None, help="folder for checkpoints and logs")
    a("--epochs", type=positive_int, default=None)
    a("--batch-size", type=positive_int, default=None, help="images per process")
    a("--min-size", type=positive_int, default=None, help="short side (default 800)")
    a("--max-size", type=positive_int, default=None, help="long side at most (default 1333)")
    a("--lr", type=positive_float, default=None)
    a("--weight-decay", type=non_negative_float, default=None)
    a("--warmup-iters", type=non_negative_int, default=None)
    a("--steps", type=positive_int, nargs="+", default=None, metavar="EPOCH",
      help="epochs after which the lr drops x0.1 (default 8 11)")
    a("--clip-grad", type=positive_float, default=None, help="max gradient norm")
    a("--drop-path", type=below_one, default=None,
      help="backbone stochastic depth (default: 0.4/0.6/0.7 for tiny/small/base, else 0.1)")
    a("--pos-bias", default=None, choices=["interpolate", "extrapolate"])
    a("--img-size", type=positive_int, default=None,
      help="interpolate mode: the size the bias is built at (default: --min-size)")
    a("--pretrain-size", type=positive_int, default=None, help="backbone option")
    a("--flip", type=probability, default=None, help="horizontal flip probability (0.5)")
    a("--fpn-channels", type=positive_int, default=None, help="FPN width (released: 256)")
    a("--box-fc", type=positive_int, default=None, help="box head FC width (1024)")
    a("--mask-channels", type=positive_int, default=None, help="mask head width (256)")
    a("--anchor-scale", type=positive_float, default=None,
      help="anchor side = scale x stride (released: 8)")
    a("--rpn-batch", type=positive_int, default=None, help="sampled anchors per image (256)")
    a("--roi-batch", type=positive_int, default=None, help="sampled RoIs per image (512)")
    a("--detections", type=positive_int, default=None,
      help="detections per image (Mask R-CNN 100, DINO 300)")
    a("--backbone-lr-mult", type=positive_float, default=None,
      help="backbone learning-rate factor (DINO: 0.1)")
    a("--num-queries", type=positive_int, default=None, help="DINO queries (900)")
    a("--dn-queries", type=non_negative_int, default=None,
      help="DINO denoising queries (100; 0: no denoising)")
    a("--device", type=device_name, default=None)
    a("--amp", default=None, choices=["bf16", "fp16", "none"])
    a("--compile", action="store_true", help="torch.compile the backbone (Mask R-CNN)")
    a("--cuda-graphs", action="store_true",
      help="replay the TransNeXt's training forward and backward from CUDA graphs: batches "
           "are padded to one of two fixed canvases (landscape and portrait, from "
           "--min-size/--max-size or DINO's scales), one graph each; FPN, heads and losses "
           "stay eager (one GPU, or torchrun without DDP, as `train --cuda-graphs`)")
    a("--pretrained", default=None, type=existing_file, metavar="PATH",
      help="ImageNet backbone weights, a released Mask R-CNN or DINO .pth (same "
           "architecture) or a det train checkpoint")
    a("--resume", default=None, type=existing_file, metavar="PATH",
      help="continue from a last.pth exactly")
    a("--time-budget", type=non_negative_float, default=None, metavar="SECONDS",
      help="fit training + the final evaluation into this wall time: --epochs becomes a "
           "maximum and the step schedule follows the clock (0: off)")
    a("--eval-reserve", type=non_negative_float, default=None, metavar="SECONDS",
      help="with --time-budget: the time kept for the final evaluation")
    a("--eval-interval", type=positive_int, default=None, help="evaluate every N epochs")
    a("--ckpt-interval", type=positive_int, default=None, metavar="ITERS",
      help="also write last.pth every N iterations (default: each epoch)")
    add_run_flags(a)
    t.set_defaults(func=_run_train, check=_check_train)

    e = ss.add_parser("eval", help="COCO box and mask AP on a val set")
    a = e.add_argument
    a("--checkpoint", required=True, type=existing_file,
      help="det train checkpoint, det convert .safetensors or released .pth")
    a("--model", default=None, type=arch_name, help="expected TransNeXt variant (checked)")
    _data_flags(a, train=False)
    a("--batch-size", type=positive_int, default=1, help="images per forward (mmdet: 1)")
    a("--workers", type=non_negative_int, default=2)
    a("--min-size", type=positive_int, default=None, help="test short side (default: the "
                                                          "checkpoint's)")
    a("--max-size", type=positive_int, default=None)
    a("--device", type=device_name, default=None)
    a("--amp", default="none", choices=["bf16", "fp16", "none"])
    a("--threads", type=positive_int, default=None, help="CPU intra-op threads")
    a("--results", default=None, metavar="PREFIX",
      help="write PREFIX.bbox.json and PREFIX.segm.json (COCO result format)")
    a("--json", default=None, type=output_file, metavar="PATH", help="write the metrics here")
    a("--no-verify", action="store_true")
    _graphs_flag(a)
    e.set_defaults(func=_run_eval, check=_check_eval)

    pr = ss.add_parser("predict", help="draw detections on images, write COCO results")
    a = pr.add_argument
    a("images", nargs="+", metavar="IMAGE")
    a("--checkpoint", required=True, type=existing_file)
    a("--model", default=None, type=arch_name)
    a("--output", required=True, help="folder for <name>.png and predictions.json")
    a("--score-thr", type=probability, default=0.3, help="draw and write detections from "
                                                         "this score (0.3)")
    a("--min-size", type=positive_int, default=None)
    a("--max-size", type=positive_int, default=None)
    a("--device", type=device_name, default=None)
    a("--amp", default="none", choices=["bf16", "fp16", "none"])
    a("--threads", type=positive_int, default=None)
    _graphs_flag(a)
    pr.set_defaults(func=_run_predict, check=_check_predict)

    c = ss.add_parser("convert", help="a released Mask R-CNN or DINO .pth -> safetensors + "
                                      "json config")
    a = c.add_argument
    a("checkpoint", type=existing_file, help="e.g. mask_rcnn_transnext_tiny_fpn_1x_coco_in1k.pth "
                                             "or dino_4scale_transnext_tiny_12e_in1k.pth")
    a("output", type=output_file, help="e.g. maskrcnn-tiny.safetensors (the config goes "
                                       "beside it as .json)")
    c.set_defaults(func=_run_convert)

    m = ss.add_parser("make-mosaics", help="write the Fashion-MNIST instance mosaics "
                                           "(COCO layout)")
    a = m.add_argument
    a("--output", required=True)
    a("--train", type=positive_int, default=4000, help="training mosaics (train split items)")
    a("--val", type=positive_int, default=500, help="held-out mosaics (test split items)")
    a("--size", type=positive_int, default=128, help="canvas side in pixels")
    a("--seed", type=non_negative_int, default=0)
    a("--fashion-mnist-dir", default=None, type=existing_dir,
      help="idx files (default: Debian's location)")
    m.set_defaults(func=_run_mosaics)


def _graphs_flag(a) -> None:
    a("--cuda-graphs", action="store_true",
      help="replay the TransNeXt's forward from CUDA graphs, one per padded batch shape (up "
           "to 48, sharing one memory pool; other shapes run eagerly); FPN or channel "
           "mapper and heads stay eager (GPU only)")


def _infer_graphs(model) -> None:
    """--cuda-graphs of eval and predict: the TransNeXt's inference graphs."""
    from ...engine.cuda_graphs import INFER_GRAPHS
    from .canvas import graph_holder
    graph_holder(model).use_cuda_graphs(train=False, infer=True, max_infer_graphs=INFER_GRAPHS)


def _graphs_line(model) -> str:
    from ...engine.cuda_graphs import summary
    from .canvas import graph_holder
    return summary(graph_holder(model).graphed)


MASKRCNN_ONLY = {"fpn_channels", "box_fc", "mask_channels", "anchor_scale", "rpn_batch",
                 "roi_batch"}
DINO_ONLY = {"num_queries", "dn_queries", "backbone_lr_mult"}


def _given(args) -> set[str]:
    return {k for k, v in vars(args).items() if v is not None and v is not False}


def _check_data(args, train: bool) -> None:
    pairs = [("val_ann", "val_images")] + ([("train_ann", "train_images")] if train else [])
    for ann, imgs in pairs:
        if bool(getattr(args, ann)) != bool(getattr(args, imgs)):
            have, lack = (ann, imgs) if getattr(args, ann) else (imgs, ann)
            raise UsageError(f"--{have.replace('_', '-')} needs --{lack.replace('_', '-')}")
    explicit = getattr(args, "train_ann", None) if train else args.val_ann
    if not args.data_dir and not explicit:
        need = "--train-ann/--train-images" if train else "--val-ann/--val-images"
        raise UsageError(f"no data: pass --data-dir (COCO layout) or {need}")


def _check_train(args) -> None:
    from . import recipes
    given = _given(args)
    recipes.resolve(args)
    if not args.model:
        raise UsageError("--model is required (or a --recipe that names one)")
    if not args.output:
        raise UsageError("--output is required")
    why = writable_dir(args.output)
    if why:
        raise UsageError(f"--output {args.output}: {why}")
    _check_data(args, train=True)
    if args.resume and args.pretrained:
        raise UsageError("--resume restores the run's own weights; drop --pretrained")
    if args.resume and "time_budget" in given and args.time_budget:
        raise UsageError("--time-budget belongs to a new run; a resumed run keeps the "
                         "budget it was started with (drop --time-budget)")
    if args.max_size < args.min_size:
        raise UsageError(f"--max-size {args.max_size} is below --min-size {args.min_size}")
    if list(args.steps) != sorted(args.steps):
        raise UsageError(f"--steps {' '.join(map(str, args.steps))}: give them in "
                         f"increasing order")
    if "img_size" in given and args.pos_bias == "extrapolate":
        raise UsageError("--img-size sets interpolate mode's bias size; it has no effect with "
                         "--pos-bias extrapolate")
    if "eval_reserve" in given and not args.time_budget:
        raise UsageError("--eval-reserve has no effect without --time-budget")
    if args.compile and args.arch.startswith("dino"):
        # compiling its forward_intermediates failed under dynamo (H200, torch 2.11)
        raise UsageError("--compile is not available for --arch dino-* yet (Mask R-CNN only)")
    other = MASKRCNN_ONLY if args.arch.startswith("dino") else DINO_ONLY
    wrong = sorted(given & other)
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise UsageError(f"{flags}: not an option of --arch {args.arch}")


def _check_eval(args) -> None:
    _check_data(args, train=False)


def _check_predict(args) -> None:
    for image in args.images:
        p = Path(image)
        if p.is_dir():
            raise UsageError(f"{image} is a folder; pass image files (e.g. {p / '*.png'})")
        if not p.is_file():
            raise UsageError(f"image file not found: {image}")


def _size_overrides(args) -> dict:
    kw = {}
    if args.min_size:
        kw["min_size"] = args.min_size
    if args.max_size:
        kw["max_size"] = args.max_size
    return kw


def _run_train(args):
    from .train import train
    summary = train(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


def _run_eval(args):
    import torch

    from ...engine.cuda_graphs import check_cuda_graphs
    from ...engine.distributed import cleanup, init_distributed
    from ...ops.cpu_linear import pack_on_cpu
    from .coco import CocoDetection, resolve_coco
    from .evaluate import check_classes, evaluate, load_model
    from .evaluation import format_table
    dist = init_distributed(args.device)
    try:
        if args.cuda_graphs:  # before reading anything
            check_cuda_graphs(dist.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        ann, imgs = resolve_coco(args.data_dir, "val", args.val_ann, args.val_images)
        model = load_model(args.checkpoint, args.model, **_size_overrides(args))
        masks = not model.transnext_config.get("arch", "mask-rcnn").startswith("dino")
        ds = CocoDetection(ann, imgs, with_masks=masks)
        if not args.no_verify:
            ds.check_images(workers=max(2, args.workers))
        check_classes(model, ds, f"checkpoint {args.checkpoint}")
        pack_on_cpu(model.to(dist.device), dist.device)  # fp32 CPU products, packed weights
        if args.cuda_graphs:
            _infer_graphs(model)
        import time
        t0 = time.time()
        res, ev = evaluate(model, ds, dist.device, rank=dist.rank, world_size=dist.world_size,
                           amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                           progress=dist.is_main and sys.stderr.isatty(), with_masks=masks)
        seconds = time.time() - t0
        if dist.is_main:
            if ds.report.summary():
                print(ds.report.summary(), flush=True)
            print(format_table(res), flush=True)
            print(f"{len(ds)} images, {seconds:.1f}s", flush=True)
            if args.cuda_graphs:  # rank 0's count
                print(_graphs_line(model), flush=True)
            if args.results:
                paths = ev.write_results(args.results)
                print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {**res, "images": len(ds), "seconds": seconds,
                     "checkpoint": str(args.checkpoint), "processes": dist.world_size},
                    indent=1, default=str))
    finally:
        cleanup()


def _run_predict(args):
    from ...engine.cuda_graphs import check_cuda_graphs
    from ...engine.distributed import resolve_device
    from ...ops.cpu_linear import pack_on_cpu
    from .evaluate import load_model
    from .predict import predict_files
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cuda_graphs:  # before loading anything
        check_cuda_graphs(device)
    model = load_model(args.checkpoint, args.model, **_size_overrides(args)).to(device)
    pack_on_cpu(model, device)  # fp32 CPU products from packed weights
    if args.cuda_graphs:
        _infer_graphs(model)
    for r in predict_files(model, args.images, args.output, device, score_thr=args.score_thr,
                           amp=args.amp):
        dets = ", ".join(f"{n} {s:.2f}" for n, s in r["detections"]) or "nothing"
        print(f"{r['image']}: {r['output']} ({dets})", flush=True)
    print(f"wrote {Path(args.output) / 'predictions.json'}", flush=True)
    if args.cuda_graphs:
        print(_graphs_line(model), flush=True)


def _run_convert(args):
    from ...engine.errors import UserError
    from ...models import CheckpointError
    from .convert import convert_file
    try:
        st, cfg = convert_file(args.checkpoint, args.output)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    conf = json.loads(cfg.read_text())
    print(f"wrote {st} and {cfg} ({conf.get('arch', 'Mask R-CNN')} on {conf['model']}, "
          f"{conf['num_classes']} "
          f"classes{', class names from the file' if conf.get('class_names') else ''})",
          flush=True)


def _run_mosaics(args):
    from .mosaics import write_instance_mosaics
    out = write_instance_mosaics(args.output, args.train, args.val, size=args.size,
                                 seed=args.seed, data_dir=args.fashion_mnist_dir)
    print(f"wrote {args.train} training and {args.val} held-out instance mosaics to {out} "
          f"(COCO layout)", flush=True)
