"""Sizes derived from a transformers config, computed in one place (attention, accounting, layouts)."""

from __future__ import annotations


def head_dim_of(config) -> int:
    """``head_dim`` when the config sets it (0.3B: 128 with hidden 1024 and 16 heads), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    """Key/value heads (GQA); a config without ``num_key_value_heads`` is multi-head attention."""
    return config.num_key_value_heads or config.num_attention_heads
