"""ernie45: PyTorch-native ERNIE 4.5 (dense and MoE) with exact Hugging Face parity."""

from . import models
from .auto import from_config, from_pretrained
from .models import *  # noqa: F403  (the model classes, BackendConfig, ModelCapabilities)
from .models.registry import model_class_for
from .moe import MoEConfig

__version__ = "0.1.0"

__all__ = [*models.__all__, "MoEConfig", "from_config", "from_pretrained", "model_class_for"]
