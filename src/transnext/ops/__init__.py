"""Attention ops: a public op per attention kind, a reference beside every kernel."""
from .aggregated_attention import aggregated_attention, backend_from_env
from .full_attention import full_attention
from .reference import aggregated_attention_reference, full_attention_reference

__all__ = [
    "aggregated_attention",
    "aggregated_attention_reference",
    "backend_from_env",
    "full_attention",
    "full_attention_reference",
]
