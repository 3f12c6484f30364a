"""Dense ERNIE 4.5 (e.g. ERNIE-4.5-0.3B), configured by transformers' ``Ernie4_5Config``.

AutoModel-compatible API: ``Ernie4_5Attention``, ``Ernie4_5Block``, ``Ernie4_5Model``,
``Ernie4_5ForCausalLM``, ``ModelClass``, ``_config_dtype`` are the names NeMo AutoModel's
``ernie4_5`` module exports, so code and recipes written against it work unchanged here.
The math lives in decoder.py / attention.py; this file names the dense pieces.
"""

from __future__ import annotations

from ..checkpoint.state_dict_adapter import Ernie4_5StateDictAdapter
from ..dtypes import config_dtype as _config_dtype  # AutoModel's name for it
from .attention import Ernie4_5Attention
from .backend import BackendConfig
from .capabilities import ModelCapabilities
from .causal_lm import Ernie4_5CausalLMBase
from .decoder import DecoderModel, Ernie4_5Block


class Ernie4_5Model(DecoderModel):
    """Embedding -> dense blocks -> final norm."""

    def __init__(self, config, backend: BackendConfig | None = None):
        backend = backend or BackendConfig()
        blocks = [Ernie4_5Block(config, backend) for _ in range(config.num_hidden_layers)]
        super().__init__(config, backend, blocks)


class Ernie4_5ForCausalLM(Ernie4_5CausalLMBase):
    """Dense causal LM; untied heads are supported (transformers' dense head never has a bias)."""

    model_type = "ernie4_5"

    def __init__(self, config, backend: BackendConfig | None = None):
        super().__init__(config, Ernie4_5Model(config, backend), lm_head_bias=False)
        if self.backend.enable_hf_state_dict_adapter:
            self.state_dict_adapter = Ernie4_5StateDictAdapter(config)

    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        return ModelCapabilities(
            is_moe=False, supports_tp=True, supports_cp=True, supports_pp=True, supports_fsdp=True,
            supports_activation_checkpointing=True, supports_kv_cache=True,
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
