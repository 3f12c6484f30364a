"""What a model class supports, so launchers can refuse impossible layouts before starting."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCapabilities:
    """Flags that tell the truth about what this project implements for a given config."""

    is_moe: bool
    supports_tp: bool = False
    supports_cp: bool = False
    supports_pp: bool = False
    supports_ep: bool = False
    supports_fsdp: bool = False
    supports_activation_checkpointing: bool = False
    supports_kv_cache: bool = False
    supports_untied_embeddings: bool = True
    attention_backends: tuple[str, ...] = ("sdpa", "eager", "flex")
    expert_backends: tuple[str, ...] = ()
