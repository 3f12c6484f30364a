"""Checks of a model config's values, before any weight is allocated.

transformers' configs check types but not values: ``num_attention_heads=0`` builds a model with
no attention heads, ``hidden_size=-8`` fails deep inside torch, ``rms_norm_eps=nan`` trains NaNs.
``check_model_config`` names the first impossible value, what it is and what would be valid, in
one ValueError. It takes a transformers config (every field present) or a plain mapping such as a
recipe's ``model.config`` (only the keys given are checked; pairs only when both are given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .rope import rope_type

# sizes that count something: integers >= 1 (None, where a config allows it, means "derive it")
POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
    "moe_num_experts", "moe_k", "moe_intermediate_size", "moe_layer_interval",
)  # fmt: skip
NON_NEGATIVE_INTS = ("moe_num_shared_experts", "moe_layer_start_index")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "moe_norm_min")
NON_NEGATIVE_FLOATS = ("router_aux_loss_coef", "initializer_range")
SWIGLU_ACTIVATIONS = ("silu", "swish")  # transformers' two names of x * sigmoid(x)


def _get(config: Any, key: str) -> Any:
    """The value of ``key`` (None when absent), from a mapping or a config object."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def rope_theta(config: Any) -> Any:
    """RoPE's base: ``rope_parameters["rope_theta"]`` (transformers 5) or a top-level ``rope_theta``."""
    parameters = _get(config, "rope_parameters")
    if isinstance(parameters, Mapping) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    return _get(config, "rope_theta")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # NOTE: True is an int in Python


def _is_finite_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_int(key: str, value: Any, minimum: int) -> None:
    if value is not None and not (_is_int(value) and value >= minimum):
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}")


def check_float(key: str, value: Any, positive: bool) -> None:
    if value is None:
        return
    if not (_is_finite_number(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{key}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")


def check_model_config(config: Any) -> None:
    """Raise one ValueError naming the first impossible value of an ERNIE 4.5 config (dense or MoE)."""
    for key in POSITIVE_INTS:
        check_int(key, _get(config, key), 1)
    for key in NON_NEGATIVE_INTS:
        check_int(key, _get(config, key), 0)
    end = _get(config, "moe_layer_end_index")
    if end is not None and not (_is_int(end) and end >= -1):
        raise ValueError(f"moe_layer_end_index={end!r} must be an integer >= 0, or -1 for the last layer")
    for key in POSITIVE_FLOATS:
        check_float(key, rope_theta(config) if key == "rope_theta" else _get(config, key), positive=True)
    for key in NON_NEGATIVE_FLOATS:
        check_float(key, _get(config, key), positive=False)
    act = _get(config, "hidden_act")
    if act is not None and act not in SWIGLU_ACTIVATIONS:
        raise ValueError(
            f"hidden_act={act!r}: ERNIE 4.5's feed-forward and experts are SwiGLU, and ernie45 implements them "
            "with SiLU only (every released checkpoint); use hidden_act='silu'"
        )
    rope_type(config)  # a RoPE type transformers knows, rotating whole heads
    check_relations(config)


def check_relations(config: Any) -> None:
    """Values that are each valid but do not fit together."""
    heads, kv_heads = _get(config, "num_attention_heads"), _get(config, "num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} "
            "(grouped-query attention shares each key/value head among an equal number of query heads)"
        )
    head_dim = _get(config, "head_dim")
    if head_dim is not None and head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (rotary embeddings rotate pairs of dimensions)")
    experts, k = _get(config, "moe_num_experts"), _get(config, "moe_k")
    if experts is not None and k is not None and k > experts:
        raise ValueError(f"moe_k={k} must be between 1 and moe_num_experts={experts} (each token picks k experts)")
