"""Attention ops: a public op per attention kind, a reference beside every kernel."""
from .aggregated_attention import (aggregated_attention, aggregated_attention_packed,
                                   backend_from_env)
from .full_attention import full_attention
from .msda import MultiScaleDeformableAttention, ms_deform_attn
from .msda_reference import ms_deform_attn_reference
from .reference import aggregated_attention_reference, full_attention_reference

__all__ = [
    "aggregated_attention",
    "aggregated_attention_packed",
    "aggregated_attention_reference",
    "backend_from_env",
    "full_attention",
    "full_attention_reference",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "MultiScaleDeformableAttention",
]
