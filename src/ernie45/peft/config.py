"""``PeftConfig``: which modules get LoRA and how, under NeMo AutoModel's ``peft:`` names.

AutoModel's meaning, kept: ``target_modules`` are globs (``*`` = any characters, dots included)
matched against whole module names (``model.layers.0.self_attn.q_proj``), or a name given
exactly; ``exclude_modules`` means "every linear layer but these"; ``match_all_linear`` every
linear layer. The two lists exclude each other, and ``match_all_linear`` excludes both; with none
given the target is ``*_proj``. Routed experts (``mlp.experts``) are adapted only when a
``target_modules`` glob names them (``*`` or ``*.experts``), never by ``match_all_linear`` or
``exclude_modules``. ``moe_rank_scaling`` gives the experts rank ``dim // moe_k`` (top-k), as
AutoModel does. Scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora`` (PEFT's
name; AutoModel has no such key).

Where we differ, said here: ``dropout`` applies to linear targets only (PEFT refuses dropout on
expert tensors, AutoModel ignores it there); expert ``lora_A`` is drawn per expert as a linear
layer's would be (AutoModel draws the whole [E,in,r] tensor at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..dtypes import as_dtype

A_INITS = ("xavier", "kaiming")
DROPOUT_POSITIONS = ("pre", "post")
DEFAULT_TARGETS = ["*_proj"]


def _patterns(value, key: str) -> list[str]:
    """A glob or a list of globs, as a list (AutoModel accepts a bare string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"peft.{key}={value!r} must be a module-name glob or a list of them, e.g. ['*_proj']")
    return list(value)


@dataclass
class PeftConfig:
    """LoRA settings (AutoModel's ``peft:`` keys, plus PEFT's ``use_rslora``)."""

    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)
    match_all_linear: bool = False
    dim: int = 8
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "post"
    lora_A_init: str = "xavier"
    lora_dtype: torch.dtype | str | None = None
    moe_rank_scaling: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.target_modules = _patterns(self.target_modules, "target_modules")
        self.exclude_modules = _patterns(self.exclude_modules, "exclude_modules")
        if self.target_modules and self.exclude_modules:
            raise ValueError("peft.target_modules and peft.exclude_modules exclude each other; give one of them")
        if self.match_all_linear and (self.target_modules or self.exclude_modules):
            raise ValueError("peft.match_all_linear=true takes no target_modules/exclude_modules; drop one of them")
        if not (self.match_all_linear or self.target_modules or self.exclude_modules):
            self.target_modules = list(DEFAULT_TARGETS)
        for key in ("match_all_linear", "moe_rank_scaling", "use_rslora"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"peft.{key}={getattr(self, key)!r} must be true or false")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"peft.dim={self.dim!r} must be a positive integer (the LoRA rank)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"peft.alpha={self.alpha!r} must be a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"peft.dropout={self.dropout!r} must be in [0, 1)")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"peft.dropout_position={self.dropout_position!r}; choose one of {DROPOUT_POSITIONS}")
        if self.lora_A_init not in A_INITS:
            raise ValueError(f"peft.lora_A_init={self.lora_A_init!r}; choose one of {A_INITS}")
        self.lora_dtype = as_dtype(self.lora_dtype, "peft.lora_dtype")

    def scale(self, rank: int) -> float:
        """The factor on ``B A`` for an adapter of ``rank``."""
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def expert_rank(self, top_k: int) -> int:
        """The routed experts' rank: ``dim``, or ``dim // top_k`` under ``moe_rank_scaling``."""
        if not self.moe_rank_scaling:
            return self.dim
        if self.dim < top_k:
            raise ValueError(
                f"peft.moe_rank_scaling: dim={self.dim} // moe_k={top_k} is rank 0; raise dim to at least {top_k}"
            )
        return self.dim // top_k

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
