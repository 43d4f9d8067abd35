"""The `transnext eval` job: top-1/top-5/loss at one or more input sizes, the linear
inference mode (--fixed-pool-size), and the robustness suite. Table + JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import DataError, TensorBatches, default_class_names, load_fashion_mnist
from ..data import fashion_mnist as fm
from ..engine import checkpointing as ckpt
from ..engine.distributed import cleanup, init_distributed
from ..engine.errors import UserError
from ..engine.evaluate import evaluate
from ..engine.loaders import folder_eval_loader
from ..engine.models import create, data_config
from ..ops import cpu_linear


def load_for_inference(model_name: str, checkpoint: str | None, *, device, num_classes=None,
                       in_chans=None, use_ema=False, default_in_chans=3, **model_kwargs):
    """Build ``model_name`` sized to fit ``checkpoint`` and load it.
    Returns (model, meta) with meta: class_names, input_size, in_chans, num_classes."""
    obj = ckpt.read_file(checkpoint) if checkpoint else None
    meta = {"class_names": None, "input_size": None, "mean": None, "std": None,
            "dataset": None}
    if obj is not None:
        ckpt.check_model_name(obj, checkpoint, model_name)
    if ckpt.is_training_checkpoint(obj):
        num_classes = num_classes or int(obj["num_classes"])
        in_chans = in_chans or int(obj.get("in_chans") or default_in_chans)
        meta["class_names"] = list(obj.get("class_names") or []) or None
        meta["input_size"] = obj.get("input_size")
        meta["mean"], meta["std"] = obj.get("mean"), obj.get("std")
        meta["dataset"] = obj.get("dataset")
        for key in ("pretrain_size", "img_size"):
            v = (obj.get("args") or {}).get(key)
            if v is not None and model_kwargs.get(key) is None:
                model_kwargs[key] = v
    elif obj is not None:
        sd = ckpt.state_dict_of(obj)
        num_classes = num_classes or ckpt.head_classes(sd) or 1000
        first_conv = next((v for v in sd.values() if getattr(v, "ndim", 0) == 4), None)
        if in_chans is None and first_conv is not None:
            in_chans = int(first_conv.shape[1])
    num_classes = num_classes or 1000
    in_chans = in_chans or default_in_chans
    model = create(model_name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    if obj is not None:
        ckpt.load_weights(model, obj, checkpoint, use_ema=use_ema)
    model.to(device).eval()
    if meta["class_names"] is None or len(meta["class_names"]) != num_classes:
        meta["class_names"] = default_class_names(num_classes)
    meta.update(num_classes=num_classes, in_chans=in_chans)
    return model, meta


def _set_pool(model, n, model_name):
    fn = getattr(model, "set_fixed_pool_size", None)
    if fn is None:
        if n is None:
            return
        raise UserError(f"model '{model_name}' has no linear inference mode (set_fixed_pool_size)")
    fn(n)


def format_table(rows: list[dict]) -> str:
    lines = ["| input size | mode | top-1 | top-5 | loss | images |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['input_size']} | {r['mode']} | {r['top1']:.2f} | {r['top5']:.2f} | "
                     f"{r['loss']:.4f} | {r['count']} |")
    return "\n".join(lines)


def _threads(args):
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def run(args) -> dict:
    _threads(args)
    dist = init_distributed(args.device)
    try:
        return _run(args, dist)
    finally:
        cleanup()


def _run(args, dist) -> dict:
    device = dist.device
    fashion = args.dataset == "fashion-mnist"
    model, meta = load_for_inference(
        args.model, args.checkpoint, device=device, num_classes=args.num_classes,
        in_chans=args.in_chans, use_ema=args.use_ema, default_in_chans=1 if fashion else 3,
        pretrain_size=args.pretrain_size)
    cpu_linear.pack_on_cpu(model, device)  # fp32 products from packed weights (oneDNN)
    dcfg = data_config(model)
    default_size = meta["input_size"] or dcfg["input_size"][-1]
    sizes = args.input_size or [default_size]
    modes = [None]
    if args.fixed_pool_size:
        modes = [None, args.fixed_pool_size] if args.both_modes else [args.fixed_pool_size]
    result: dict = {"model": args.model, "checkpoint": args.checkpoint, "rows": []}

    if args.data_dir or fashion:
        if fashion:
            try:
                x, y = load_fashion_mnist(args.data_dir, "test")
            except DataError as e:
                raise UserError(str(e)) from None
            if args.limit:
                x, y = x[: args.limit], y[: args.limit]
        for size in sizes:
            if fashion:
                c = meta["in_chans"]
                loader = TensorBatches(x, y, args.batch_size, size, train=False, in_chans=c,
                                       mean=fm.MEAN * c, std=fm.STD * c, rank=dist.rank,
                                       world_size=dist.world_size, device=device)
            elif args.dataset == "shards":
                from ..data import eval_transform
                from ..engine.loaders import dataset_eval_loader, shard_datasets
                c = meta["in_chans"]
                tf = eval_transform(size, (meta["mean"] or dcfg["mean"][:c]),
                                    (meta["std"] or dcfg["std"][:c]), crop_pct=dcfg["crop_pct"],
                                    interpolation=dcfg["interpolation"])
                try:
                    _, vds, _ = shard_datasets(args.data_dir, None, tf, c)
                except DataError as e:
                    raise UserError(str(e)) from None
                if vds is None:
                    raise UserError(f"no val/ shards in {args.data_dir}")
                loader = dataset_eval_loader(vds, args.batch_size, dist, workers=args.workers)
            else:
                root = Path(args.data_dir)
                if not root.is_dir():
                    raise UserError(f"data directory does not exist: {root}")
                if (root / "val").is_dir():
                    root = root / "val"
                names = meta["class_names"]
                try:
                    from ..engine.loaders import _gray  # noqa: F401
                    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
                    classes = names if names and set(folders) <= set(names) else None
                    class_map = None
                    if classes is None and meta["num_classes"] == 1000:
                        from ..engine.robustness import imagenet_class_map
                        class_map = imagenet_class_map(root)
                    loader = folder_eval_loader(root, size, dcfg, args.batch_size, dist,
                                                workers=args.workers, in_chans=meta["in_chans"],
                                                classes=classes, class_to_idx=class_map,
                                                verify=not args.no_verify)
                except DataError as e:
                    raise UserError(str(e)) from None
            for mode in modes:
                _set_pool(model, mode, args.model)
                r = evaluate(model, loader, device, amp=args.amp)
                result["rows"].append({"input_size": size,
                                       "mode": "default" if mode is None else f"linear (pool {mode})",
                                       **r})
        _set_pool(model, None, args.model)
        if dist.is_main:
            print(format_table(result["rows"]), flush=True)

    if args.suite == "robustness":
        from ..engine.robustness import format_suite, run_suite
        _set_pool(model, args.fixed_pool_size, args.model)
        result["robustness"] = run_suite(model, sizes[0], dcfg, args, dist)
        if dist.is_main:
            print(format_suite(result["robustness"]), flush=True)
    elif not (args.data_dir or fashion):
        raise UserError("nothing to evaluate: pass --data-dir (or --dataset fashion-mnist) "
                        "or --suite robustness with its folders")
    if args.json and dist.is_main:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result
