"""The TransNeXt family; importing registers it with timm."""
from .archs import ARCHS, PRETRAIN_SIZE
from .checkpoint import (CheckpointError, apply_checkpoint, checkpoint_filter_fn, load_checkpoint,
                         read_checkpoint)
from .transnext import TransNeXt

__all__ = ["ARCHS", "PRETRAIN_SIZE", "CheckpointError", "TransNeXt", "apply_checkpoint", "checkpoint_filter_fn",
           "load_checkpoint", "read_checkpoint"]
