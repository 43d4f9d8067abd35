"""Semantic segmentation with TransNeXt backbones on transformers' heads.

``build_upernet`` makes a ``TransNeXtUperNet`` (transformers'
``UperNetForSemanticSegmentation`` with a TransNeXt backbone and the pieces
where the original mmseg stack computes something else); ``convert`` loads the
released ADE20K checkpoints; ``inference`` and ``metrics`` evaluate as mmseg.
"""
from .model import TransNeXtUperNet, build_upernet, upernet_config

__all__ = ["TransNeXtUperNet", "build_upernet", "upernet_config"]
