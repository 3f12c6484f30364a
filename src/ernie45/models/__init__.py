"""ERNIE 4.5 model code, written for a single device (parallelised from outside)."""

from .backend import BackendConfig
from .capabilities import ModelCapabilities
from .ernie4_5 import Ernie4_5Attention, Ernie4_5Block, Ernie4_5ForCausalLM, Ernie4_5Model
from .ernie4_5_moe import Ernie4_5_MoeForCausalLM, Ernie4_5_MoeModel, Ernie4_5MoeBlock

__all__ = [
    "BackendConfig",
    "Ernie4_5Attention",
    "Ernie4_5Block",
    "Ernie4_5ForCausalLM",
    "Ernie4_5Model",
    "Ernie4_5MoeBlock",
    "Ernie4_5_MoeForCausalLM",
    "Ernie4_5_MoeModel",
    "ModelCapabilities",
]
