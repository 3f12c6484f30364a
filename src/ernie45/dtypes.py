"""One parser for dtypes given by name or object, as transformers and recipes write them."""

from __future__ import annotations

import torch


def as_dtype(value: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """``value`` as a floating-point ``torch.dtype``; None and "auto" give None (the caller's default).

    Accepts ``torch.bfloat16``, "bfloat16", "torch.bfloat16" (what config.json and YAML hold).
    ``what`` names the setting in the error, e.g. "BackendConfig.gate_precision".
    """
    if value is None or value == "auto":
        return None
    resolved = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"{what}={value!r} is not a floating-point dtype; use float32, bfloat16 or float16")
    return resolved


def named_dtype(config) -> torch.dtype | None:
    """The floating-point dtype a transformers config names (``dtype``/``torch_dtype``); None when
    it names none, or one that is not a floating-point dtype."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        return as_dtype(named)
    except ValueError:
        return None


def config_dtype(config) -> torch.dtype:
    """The dtype a transformers config asks for; float32 when it names none (as transformers builds
    such configs)."""
    return named_dtype(config) or torch.float32


def dtype_argument(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``dtype``, or transformers' older name for it ``torch_dtype`` (recipes still pass it); not both."""
    if dtype is not None and torch_dtype is not None and as_dtype(dtype) != as_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
    return dtype if dtype is not None else torch_dtype


def matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``tensor`` run in: autocast's when it is on for its device, else its own.

    For kernels autocast does not know (``torch._grouped_mm``, hand-written autograd functions),
    which must cast their operands themselves to follow mixed precision.
    """
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype
