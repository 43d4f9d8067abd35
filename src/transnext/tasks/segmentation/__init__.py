"""Semantic segmentation with TransNeXt backbones on transformers' heads.

``build_upernet`` makes a ``TransNeXtUperNet`` (transformers'
``UperNetForSemanticSegmentation`` with a TransNeXt backbone and the pieces
where the original mmseg stack computes something else); ``convert`` loads the
released ADE20K checkpoints; ``inference`` and ``metrics`` evaluate as mmseg.
Imported lazily: the CLI lists ``seg`` without importing transformers.
"""
_LAZY = {"TransNeXtUperNet": "model", "build_upernet": "model", "upernet_config": "model",
         "upernet_from_released": "convert", "model_from_released": "convert",
         "build_mask2former": "mask2former", "TransNeXtMask2Former": "mask2former",
         "load_model": "evaluate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
