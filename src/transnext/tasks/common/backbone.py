"""TransNeXt behind transformers' backbone interface (``AutoBackbone``).

``TransNeXtBackboneConfig`` / ``TransNeXtBackbone`` are registered with
transformers' Auto classes under ``model_type="transnext"``, so any transformers
head that takes a ``backbone_config`` (UperNet, Mask2Former, DPT, ...) can use a
TransNeXt. The backbone is built locally from the package's model registry: no
hub look-up ever happens here.
"""
from __future__ import annotations

import torch

from ...engine.cuda_graphs import GraphedStages
from ...models import ARCHS, PRETRAIN_SIZE

try:
    from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
except ImportError as e:  # the older backbone API (transformers < 5.17)
    import transformers
    raise ImportError(f"transnext's dense tasks need transformers>=5.17,<6 (found "
                      f"{transformers.__version__}): pip install 'transnext[dense]'") from e
from transformers import AutoBackbone, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BackboneOutput

POS_BIAS_MODES = ("extrapolate", "interpolate")
STAGE_NAMES = ["stage1", "stage2", "stage3", "stage4"]


def _check_mode(pos_bias, img_size):
    if pos_bias not in POS_BIAS_MODES:
        raise ValueError(f"pos_bias must be one of {POS_BIAS_MODES}, got {pos_bias!r}")
    if pos_bias == "interpolate" and img_size is None:
        raise ValueError("pos_bias='interpolate' needs img_size (512 or 800 for the released "
                         "segmentation models)")


class TransNeXtBackboneConfig(BackboneConfigMixin, PretrainedConfig):
    """A TransNeXt variant as a transformers backbone.

    Args:
        model_name: one of the package's variants (``transnext_tiny``, ...).
        pos_bias / img_size / pretrain_size / fixed_pool_size: the model's modes
            (SPEC section 5; section 9 for the released dense models).
        drop_path_rate: stochastic depth of the backbone.
        out_indices / out_features: which stages feed the head (default: all four).
    """

    model_type = "transnext"

    def __init__(self, model_name: str = "transnext_tiny", pos_bias: str = "extrapolate",
                 img_size=None, pretrain_size: int | None = None,
                 fixed_pool_size: int | None = None, drop_path_rate: float = 0.0,
                 num_channels: int = 3, out_features=None, out_indices=None, **kwargs):
        if model_name not in ARCHS:
            raise ValueError(f"unknown TransNeXt variant {model_name!r}; one of {sorted(ARCHS)}")
        _check_mode(pos_bias, img_size)
        self.model_name = model_name
        self.pos_bias = pos_bias
        self.img_size = list(img_size) if isinstance(img_size, (tuple, list)) else img_size
        self.pretrain_size = pretrain_size or PRETRAIN_SIZE.get(model_name, 224)
        self.fixed_pool_size = fixed_pool_size
        self.drop_path_rate = float(drop_path_rate)
        self.num_channels = num_channels
        self.hidden_sizes = list(ARCHS[model_name]["embed_dims"])
        kwargs.pop("hidden_sizes", None)
        kwargs.pop("stage_names", None)
        super().__init__(**kwargs)
        self.stage_names = list(STAGE_NAMES)
        if out_features is None and out_indices is None:
            out_indices = [0, 1, 2, 3]
        self.set_output_features_output_indices(out_features=out_features,
                                                out_indices=out_indices)


class TransNeXtBackbone(GraphedStages, BackboneMixin, PreTrainedModel):
    """Stage maps of a TransNeXt (NCHW, strides 4/8/16/32) as a ``BackboneOutput``.

    The network is the package's own ``TransNeXt`` (``self.model``), built through
    its public constructor; weights keep their names under ``model.``.
    """

    config_class = TransNeXtBackboneConfig
    config: TransNeXtBackboneConfig
    base_model_prefix = "transnext"
    main_input_name = "pixel_values"
    has_attentions = False

    def __init__(self, config: TransNeXtBackboneConfig):
        super().__init__(config)
        import transnext  # registers the models with timm
        img = tuple(config.img_size) if isinstance(config.img_size, list) else config.img_size
        self.model = transnext.create_model(
            config.model_name, num_classes=0, in_chans=config.num_channels,
            pos_bias=config.pos_bias, img_size=img, pretrain_size=config.pretrain_size,
            fixed_pool_size=config.fixed_pool_size, drop_path_rate=config.drop_path_rate)
        self.num_features = list(config.hidden_sizes)
        self.post_init()

    def _init_weights(self, module):
        # TransNeXt initialises itself (SPEC); transformers' generic init would
        # overwrite that (normal(0.02) convs, zero biases) and miss its own parameters.
        pass

    def set_pos_bias(self, pos_bias: str, img_size=None) -> None:
        """Switch the position-bias mode at run time (interpolate needs ``img_size``)."""
        _check_mode(pos_bias, img_size)
        if hasattr(self.model, "set_pos_bias"):
            self.model.set_pos_bias(pos_bias, img_size)
        else:
            self.model.pos_bias = pos_bias
            self.model.img_size = tuple(img_size) if isinstance(img_size, list) else img_size
        self.config.pos_bias = pos_bias
        self.config.img_size = list(img_size) if isinstance(img_size, (tuple, list)) else img_size

    def set_fixed_pool_size(self, size: int | None) -> None:
        """Linear inference mode (pool every aggregated stage to size x size; None: off)."""
        self.model.set_fixed_pool_size(size)
        self.config.fixed_pool_size = size

    def _graph_body(self):
        return self.model, [0, 1, 2, 3]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        maps = self.stage_maps(pixel_values)
        feats = tuple(maps[i] for i in self.out_indices)
        hidden = tuple(maps) if output_hidden_states else None
        if return_dict is False:
            return (feats,) + ((hidden,) if hidden is not None else ())
        return BackboneOutput(feature_maps=feats, hidden_states=hidden)


def register() -> None:
    """Make ``model_type="transnext"`` known to AutoConfig / AutoBackbone (idempotent)."""
    try:
        AutoConfig.register("transnext", TransNeXtBackboneConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoBackbone.register(TransNeXtBackboneConfig, TransNeXtBackbone)
    except ValueError:
        pass


register()


def feature_channels(model_name: str) -> list[int]:
    return list(ARCHS[model_name]["embed_dims"])


__all__ = ["TransNeXtBackbone", "TransNeXtBackboneConfig", "feature_channels", "register"]
