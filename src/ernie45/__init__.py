"""ernie45: PyTorch-native ERNIE 4.5 (dense and MoE) with exact Hugging Face parity."""

from .auto import from_pretrained, model_class_for
from .models import (
    BackendConfig,
    Ernie4_5Attention,
    Ernie4_5Block,
    Ernie4_5ForCausalLM,
    Ernie4_5Model,
    Ernie4_5_MoeForCausalLM,
    Ernie4_5_MoeModel,
    Ernie4_5MoeBlock,
    ModelCapabilities,
)
from .moe import MoEConfig

__version__ = "0.1.0"

__all__ = [
    "BackendConfig",
    "Ernie4_5Attention",
    "Ernie4_5Block",
    "Ernie4_5ForCausalLM",
    "Ernie4_5Model",
    "Ernie4_5MoeBlock",
    "Ernie4_5_MoeForCausalLM",
    "Ernie4_5_MoeModel",
    "MoEConfig",
    "ModelCapabilities",
    "from_pretrained",
    "model_class_for",
]
