"""TransNeXt vision backbones: faithful to the published weights, any input size.

``import transnext`` registers ``transnext_micro``, ``transnext_tiny``,
``transnext_small``, ``transnext_base``, ``transnext_micro_aaaa`` (and the
small unpublished ``transnext_femto``) with timm.
"""
import timm

from .models import ARCHS, CheckpointError, TransNeXt, load_checkpoint

__version__ = "0.1.0"

MODEL_NAMES = tuple(ARCHS)


def create_model(model_name: str, pretrained: bool = False, **kwargs):
    """Alias of :func:`timm.create_model` (the TransNeXt names are registered)."""
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


__all__ = ["ARCHS", "CheckpointError", "MODEL_NAMES", "TransNeXt", "__version__",
           "create_model", "load_checkpoint"]
