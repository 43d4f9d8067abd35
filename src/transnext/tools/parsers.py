"""Parsers of `transnext export|erf|attention-map` (argparse only: the tools, and torch,
are imported when a command runs). Flag values are checked here, one line per problem."""
from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("onnx", "exported-program")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    return text


def output_file(text: str) -> str:
    parent = Path(text).parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {parent} of {text} does not exist")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file name")
    return text


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write an ONNX file or a torch.export program, checked against PyTorch",
        description="Export a model for deployment. The file is run (onnxruntime or "
                    "torch.export.load) against eager PyTorch when written; with --dynamic "
                    "also at two other sizes. Prints the largest difference.")
    a = p.add_argument
    a("--model", required=True, help="e.g. transnext_tiny (any timm model name)")
    a("--checkpoint", type=existing_file, default=None, help="weights (.pth/.safetensors)")
    a("--format", required=True, choices=FORMATS)
    a("--input-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
      help="export size (default 224 224); with --dynamic the example size")
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
    p.set_defaults(func=_run("export"))


def _add_erf(sub) -> None:
    p = sub.add_parser(
        "erf", help="effective receptive field of the last stage's centre unit (heatmap)",
        description="Gradient of the centre of the last stage's output map with respect to "
                    "the input pixels, absolute, summed over channels, averaged over N "
                    "images; drawn log-scaled. Several --model names: side by side.")
    a = p.add_argument
    a("--model", required=True, nargs="+", help="one or more timm model names")
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
    p.set_defaults(func=_run("erf"))


def _add_attention_map(sub) -> None:
    p = sub.add_parser(
        "attention-map", help="aggregated attention of one query pixel over an image",
        description="The softmax weights of one query of one block, read from the reference "
                    "attention: its local window and the pooled tokens (each drawn over its "
                    "pooling cell), per head or averaged.")
    a = p.add_argument
    a("image", type=existing_file, metavar="IMAGE")
    a("--model", required=True)
    a("--checkpoint", type=existing_file, default=None)
    a("--query", type=non_negative_int, nargs=2, required=True, metavar=("Y", "X"),
      help="query pixel, row and column in the input image")
    a("--stage", type=positive_int, default=1, help="1-3 (aggregated-attention stages)")
    a("--block", type=non_negative_int, default=0, help="block index in the stage, from 0 "
                                                        "(checkpoint name block{stage}.{block})")
    a("--heads", choices=["mean", "all"], default="mean", help="average the heads or draw "
                                                               "each")
    a("--input-size", type=positive_int, default=224, help="image side fed to the model")
    a("--output", type=output_file, required=True, metavar="PNG")
    p.set_defaults(func=_run("attention_map"))


def _run(tool: str):
    def call(args):
        import importlib
        return importlib.import_module(f"transnext.tools.{tool}").run(args)
    return call


def add_tool_parsers(sub) -> None:
    _add_export(sub)
    _add_erf(sub)
    _add_attention_map(sub)
