"""pytest plugin for running timm's own ``tests/test_models.py`` on the TransNeXt models.

Loaded with ``-p timm_suite_plugin`` (see ``test_timm_suite.py``). It registers the
models before timm's file is collected (its parametrisations call ``timm.list_models``
at import), keeps only the items parametrised with a TransNeXt model, and applies this
family's exclusions the way timm's file applies its own filter lists.
"""
from __future__ import annotations

import fnmatch

import pytest

import transnext  # noqa: F401  (registers the models with timm)

# timm's markers (declared in timm's pyproject, which is not part of this run).
MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features",
           "fxforward", "fxbackward")

FAMILY = "transnext_*"

# Tests that download the published weights from the Hugging Face hub.
HUB_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")

# timm's EXCLUDE_JIT_FILTERS, for this family.
JIT_TESTS = ("test_model_forward_torchscript", "test_model_forward_fx_torchscript")
JIT_REASON = (
    "TorchScript is deprecated in PyTorch in favour of torch.export, which this model "
    "supports (tests/test_model.py::test_fullgraph_compile_and_torch_export); its forward "
    "uses what TorchScript cannot compile: per-size stage tables built and cached in "
    "Python (frozen dataclasses), an autograd.Function sharing 16-bit casts, and the "
    "Python-side choice of attention backend"
)


def pytest_configure(config):
    for name in MARKERS:
        config.addinivalue_line("markers", f"{name}: marker of timm's test_models.py")


def _model_name(item) -> str:
    spec = getattr(item, "callspec", None)
    return str(spec.params.get("model_name", "")) if spec is not None else ""


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        test = getattr(item, "originalname", item.name)
        if not fnmatch.fnmatch(_model_name(item), FAMILY) or test in HUB_TESTS:
            drop.append(item)
            continue
        if test in JIT_TESTS:
            item.add_marker(pytest.mark.skip(reason=JIT_REASON))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
