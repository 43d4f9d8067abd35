"""Parsers of `transnext export|erf|attention-map` (argparse only: the tools, and torch,
are imported when a command runs). Values go through ``cli_checks``; combinations are
refused by the ``check`` functions before any work."""
from __future__ import annotations

from pathlib import Path

from ..cli_checks import (UsageError, existing_dir, existing_file, model_name,
                          non_negative_int, output_file, positive_int)

FORMATS = ("onnx", "exported-program")


def _check_export(args) -> None:
    """Flag combinations that cannot work, before any model is built."""
    tn = ("fixed_pool_size", "pos_bias", "img_size")
    if any(getattr(args, k) is not None for k in tn) and not args.model.startswith("transnext"):
        raise UsageError(f"--fixed-pool-size/--pos-bias/--img-size are TransNeXt options; "
                         f"model '{args.model}' has none")
    if args.pos_bias == "interpolate" and args.img_size is None:
        raise UsageError("--pos-bias interpolate needs --img-size (800 for the released "
                         "detection and segmentation models)")
    if args.input_size is not None and len(args.input_size) > 2:
        raise UsageError(f"--input-size takes S or H W, got {len(args.input_size)} values")


def _check_erf(args) -> None:
    if args.checkpoint and len(args.checkpoint) != len(args.model):
        raise UsageError(f"--checkpoint: {len(args.checkpoint)} paths for {len(args.model)} "
                         f"models (one per --model, 'none' for random weights)")
    if len(set(args.model)) != len(args.model):
        raise UsageError("--model: a name is given twice")
    for c in args.checkpoint or []:
        if c != "none" and not Path(c).is_file():
            raise UsageError(f"--checkpoint: file not found: {c}")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write an ONNX file or a torch.export program, checked against PyTorch",
        description="Export a model for deployment. The file is run (onnxruntime or "
                    "torch.export.load) against eager PyTorch when written; with --dynamic "
                    "also at two other sizes. Prints the largest difference.")
    a = p.add_argument
    a("--model", type=model_name, required=True, help="e.g. transnext_tiny (any timm model)")
    a("--checkpoint", type=existing_file, default=None, help="weights (.pth/.safetensors)")
    a("--format", required=True, choices=FORMATS)
    a("--input-size", type=positive_int, nargs="+", metavar="S", default=None,
      help="export size: S (square) or H W (default 224); with --dynamic the example size")
    a("--dynamic", action="store_true", help="symbolic height and width: one file, any size "
                                             "from the model's minimum up")
    a("--output", type=output_file, required=True, metavar="FILE")
    a("--batch", type=positive_int, default=1, help="batch size of the graph (default 1)")
    a("--features-only", action="store_true", help="the backbone's 4 stage maps "
                                                   "(dense tasks) instead of logits")
    a("--fixed-pool-size", type=positive_int, default=None, help="linear mode (TransNeXt)")
    a("--pos-bias", choices=["extrapolate", "interpolate"], default=None,
      help="position-bias mode (TransNeXt; interpolate needs --img-size)")
    a("--img-size", type=positive_int, default=None, help="interpolate mode's bias size")
    a("--num-classes", type=positive_int, default=None)
    a("--in-chans", type=positive_int, default=None)
    a("--opset", type=positive_int, default=20, help="ONNX opset (default 20)")
    a("--time", type=non_negative_int, default=0, metavar="N",
      help="also time N runs of the export and of eager PyTorch (median ms)")
    a("--threads", type=positive_int, default=None, help="CPU threads")
    p.set_defaults(func=_run("export"), check=_check_export)


def _add_erf(sub) -> None:
    p = sub.add_parser(
        "erf", help="effective receptive field of the last stage's centre unit (heatmap)",
        description="Gradient of the centre of the last stage's output map with respect to "
                    "the input pixels, absolute, summed over channels, averaged over N "
                    "images; drawn log-scaled. Several --model names: side by side.")
    a = p.add_argument
    a("--model", type=model_name, required=True, nargs="+",
      help="one or more timm model names")
    a("--checkpoint", nargs="+", default=None, metavar="PATH",
      help="weights per model, in --model order ('none' for random weights)")
    a("--images", type=existing_dir, required=True, metavar="DIR",
      help="folder of images (searched recursively)")
    a("--num", type=positive_int, default=50, help="images to average over (default 50)")
    a("--input-size", type=positive_int, default=224)
    a("--output", type=output_file, required=True, metavar="PNG",
      help="heatmap; the raw maps go to <stem>.npy (<stem>_<model>.npy for several) and the "
           "area shares to <stem>.json")
    a("--device", default=None)
    a("--threads", type=positive_int, default=None, help="CPU threads")
    p.set_defaults(func=_run("erf"), check=_check_erf)


def _add_attention_map(sub) -> None:
    p = sub.add_parser(
        "attention-map", help="aggregated attention of one query pixel over an image",
        description="The softmax weights of one query of one block, read from the reference "
                    "attention: its local window and the pooled tokens (each drawn over its "
                    "pooling cell), per head or averaged.")
    a = p.add_argument
    a("image", type=existing_file, metavar="IMAGE")
    a("--model", type=model_name, required=True)
    a("--checkpoint", type=existing_file, default=None)
    a("--query", type=non_negative_int, nargs="+", required=True, metavar="Y X",
      help="query pixel, row and column in the image file")
    a("--stage", type=positive_int, default=1, help="1-3 (aggregated-attention stages)")
    a("--block", type=non_negative_int, default=0, help="block index in the stage, from 0 "
                                                        "(checkpoint name block{stage}.{block})")
    a("--heads", choices=["mean", "all"], default="mean", help="average the heads or draw "
                                                               "each")
    a("--input-size", type=positive_int, default=224, help="image side fed to the model")
    a("--output", type=output_file, required=True, metavar="PNG")
    p.set_defaults(func=_run("attention_map"), check=_check_attention_map)


def _check_attention_map(args) -> None:
    if len(args.query) != 2:
        raise UsageError(f"--query takes Y X (row, column), got {len(args.query)} values")


def _run(tool: str):
    def call(args):
        import importlib
        return importlib.import_module(f"transnext.tools.{tool}").run(args)
    return call


def add_tool_parsers(sub) -> None:
    _add_export(sub)
    _add_erf(sub)
    _add_attention_map(sub)
