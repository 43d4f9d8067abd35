"""Named training presets. Any command-line flag overrides the preset.

The ImageNet-1K recipes follow SPEC section 8 (the paper): 300 epochs, global
batch 1024 (``batch_size`` is per process: 128 x 8 GPUs), AdamW lr 1e-3, wd 0.05,
cosine to 1e-5 after 5 warm-up epochs from 1e-6, clip 1.0, RandAugment
rand-m9-mstd0.5-inc1, colour jitter 0.4, random erasing 0.25, mixup 0.8,
cutmix 1.0, label smoothing 0.1, repeated augmentation, no EMA.
"""
from __future__ import annotations

# Values used when neither a recipe nor a flag sets them.
DEFAULTS = dict(
    dataset="imagefolder", epochs=10, batch_size=64, input_size=224, in_chans=None,
    opt="adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, sched="cosine", min_lr=1e-5,
    warmup_epochs=0, warmup_lr=1e-6, clip_grad=None, drop_path=0.0, smoothing=0.1,
    aa=None, color_jitter=0.4, reprob=0.0, mixup=0.0, cutmix=0.0, mixup_prob=1.0,
    mixup_switch_prob=0.5, repeated_aug=False, ema=False, ema_decay=0.9998,
    hflip=0.5, scale_min=0.08, amp="none", accum_steps=1, workers=2, seed=0,
    eval_interval=1, train_aug="timm",
)

_IN1K = dict(
    epochs=300, batch_size=128, input_size=224, opt="adamw", lr=1e-3, weight_decay=0.05,
    sched="cosine", min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6, clip_grad=1.0,
    aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25, mixup=0.8, cutmix=1.0,
    smoothing=0.1, repeated_aug=True, ema=False, amp="bf16",
)

RECIPES: dict[str, dict] = {
    "in1k-micro": {**_IN1K, "model": "transnext_micro", "drop_path": 0.15},
    "in1k-tiny": {**_IN1K, "model": "transnext_tiny", "drop_path": 0.25},
    "in1k-small": {**_IN1K, "model": "transnext_small", "drop_path": 0.45},
    "in1k-base": {**_IN1K, "model": "transnext_base", "drop_path": 0.6},
    "ft384-small": {**_IN1K, "model": "transnext_small", "epochs": 5, "input_size": 384,
                    "lr": 1e-5, "sched": "constant", "warmup_epochs": 0, "min_lr": 1e-5,
                    "drop_path": 0.7, "cutmix": 0.0, "batch_size": 64},
    "ft384-base": {**_IN1K, "model": "transnext_base", "epochs": 5, "input_size": 384,
                   "lr": 1e-5, "sched": "constant", "warmup_epochs": 0, "min_lr": 1e-5,
                   "drop_path": 0.8, "cutmix": 0.0, "batch_size": 64},
    # The main job: transnext_femto from scratch on Fashion-MNIST, CPU-sized.
    "fmnist-femto": dict(
        model="transnext_femto", dataset="fashion-mnist", epochs=4, batch_size=128,
        input_size=28, in_chans=1, opt="adamw", lr=2e-3, weight_decay=0.05, sched="cosine",
        min_lr=1e-5, warmup_epochs=0, warmup_lr=1e-4, clip_grad=1.0, smoothing=0.1,
        drop_path=0.0, workers=0),
}


def resolve(args) -> None:
    """Fill every None attribute of ``args`` from the recipe, then DEFAULTS (in place)."""
    recipe = {}
    if getattr(args, "recipe", None):
        if args.recipe not in RECIPES:
            from .errors import UserError
            raise UserError(f"unknown recipe '{args.recipe}'; known: {', '.join(RECIPES)}")
        recipe = RECIPES[args.recipe]
    for key in set(DEFAULTS) | set(recipe):
        if getattr(args, key, None) is None:
            setattr(args, key, recipe.get(key, DEFAULTS.get(key)))
