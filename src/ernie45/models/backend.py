"""Kernel choices for the model's building blocks.

Field names follow NeMo AutoModel's ``BackendConfig`` so recipes carry over. Every value is
checked when the config is built: a backend whose library or hardware is absent here raises an
error that names the value and the ones that are available, instead of failing deep in a kernel.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields

import torch

from ..dtypes import as_dtype

# What each field accepts, and what this project implements of it.
_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "attn": ("sdpa", "eager", "flex"),
    "linear": ("torch",),
    "rms_norm": ("torch_fp32", "torch"),
    "experts": ("torch", "torch_mm"),
    "dispatcher": ("torch",),
}
# Values other stacks know that need a library or hardware we do not have or implement.
_KNOWN_UNAVAILABLE: dict[str, tuple[str, ...]] = {
    "attn": ("te", "tilelang"),
    "linear": ("te",),
    "rms_norm": ("te",),
    "experts": ("te", "gmm", "torch_mm_mxfp8"),
    "dispatcher": ("deepep", "hybridep", "uccl_ep"),
}


def _why_unavailable(value: str) -> str:
    if value == "te":
        found = importlib.util.find_spec("transformer_engine") is not None
        return "ernie45 has no Transformer Engine integration" + (
            "" if found else " and transformer_engine is not installed"
        )
    return f"'{value}' needs a library or GPU kernel that ernie45 does not integrate"


@dataclass(kw_only=True)
class BackendConfig:
    """Which kernel each component uses.

    attn: "sdpa" (default, native GQA), "eager" (reference math), "flex" (flex_attention;
        forward only on CPU). linear: "torch". rms_norm: "torch_fp32" (HF-exact fp32 math,
        default) or "torch" (fused ``F.rms_norm``). experts: "torch" (per-expert loop, the
        reference) or "torch_mm" (``torch._grouped_mm``). dispatcher: "torch" (local, or
        all-to-all under expert parallelism). fake_balanced_gate: round-robin routing with
        uniform weights, for throughput tests only. gate_precision: router compute dtype
        (default float32). prepack_cpu_inference: CPU bf16 generation and evaluation multiply by
        oneDNN-prepacked copies of the linear weights (bitwise the same logits, faster decoding;
        one extra copy of those weights while a ``prepacked_weights`` block is open), and fp32
        calls of a few rows (decode steps) by oneDNN on the plain weights (no copy; equal within
        fp32 rounding); see ``models/linear.py``.
    """

    attn: str = "sdpa"
    linear: str = "torch"
    rms_norm: str = "torch_fp32"
    rope_fusion: bool = False
    experts: str = "torch_mm"
    dispatcher: str = "torch"
    fake_balanced_gate: bool = False
    fake_gate_noise: float = 0.0
    enable_hf_state_dict_adapter: bool = True
    enable_fsdp_optimizations: bool = False
    gate_precision: str | torch.dtype | None = None
    prepack_cpu_inference: bool = True

    def __post_init__(self) -> None:
        for name, implemented in _IMPLEMENTED.items():
            value = getattr(self, name)
            if value in implemented:
                continue
            reason = _why_unavailable(value) if value in _KNOWN_UNAVAILABLE[name] else "unknown value"
            raise ValueError(
                f"BackendConfig.{name}={value!r} is not available ({reason}); "
                f"choose one of {', '.join(repr(v) for v in implemented)}"
            )
        if self.enable_fsdp_optimizations:
            raise ValueError(
                "BackendConfig.enable_fsdp_optimizations=True is not implemented in ernie45 (it tunes AutoModel's "
                "FSDP wrapping); set it to False: ernie45 applies its own FSDP2 layout"
            )
        if self.rope_fusion:
            raise ValueError("BackendConfig.rope_fusion=True needs Transformer Engine; set rope_fusion=False")
        if not 0.0 <= self.fake_gate_noise <= 1.0:
            raise ValueError(f"BackendConfig.fake_gate_noise={self.fake_gate_noise} must be in [0, 1]")
        self.gate_precision = as_dtype(self.gate_precision, "BackendConfig.gate_precision")

    @classmethod
    def from_dict(cls, values: dict) -> "BackendConfig":
        """Build from a YAML/CLI mapping, naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown backend key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)
