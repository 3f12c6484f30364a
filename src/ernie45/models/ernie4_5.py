"""Dense ERNIE 4.5 (e.g. ERNIE-4.5-0.3B), configured by transformers' ``Ernie4_5Config``.

Seed API: ``Ernie4_5Attention``, ``Ernie4_5Block``, ``Ernie4_5Model``, ``Ernie4_5ForCausalLM``.
The math lives in decoder.py / attention.py; this file names the dense pieces.
"""

from __future__ import annotations

from .attention import Ernie4_5Attention
from .backend import BackendConfig
from .capabilities import ModelCapabilities
from ..dtypes import config_dtype as _config_dtype  # AutoModel's ernie4_5 module exposes this name
from .causal_lm import Ernie4_5CausalLMBase
from .decoder import DecoderModel, Ernie4_5Block


class Ernie4_5Model(DecoderModel):
    """Every layer is a dense block."""

    def build_block(self, layer_idx: int) -> Ernie4_5Block:
        return Ernie4_5Block(self.config, self.backend)


class Ernie4_5ForCausalLM(Ernie4_5CausalLMBase):
    """Dense causal LM; untied heads are supported (the reference rejects them)."""

    model_type = "ernie4_5"
    lm_head_bias = False  # transformers' dense head never has a bias

    def __init__(self, config, backend: BackendConfig | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"Ernie4_5ForCausalLM got unexpected arguments: {sorted(kwargs)}")
        super().__init__(config, backend)

    def build_model(self) -> Ernie4_5Model:
        return Ernie4_5Model(self.config, self.backend)

    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        return ModelCapabilities(
            is_moe=False, supports_tp=True, supports_fsdp=True, supports_activation_checkpointing=True,
            supports_kv_cache=True,
        )


ModelClass = Ernie4_5ForCausalLM

__all__ = [
    "Ernie4_5Attention",
    "Ernie4_5Block",
    "Ernie4_5ForCausalLM",
    "Ernie4_5Model",
    "ModelClass",
    "_config_dtype",
]
