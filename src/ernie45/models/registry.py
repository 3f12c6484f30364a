"""config -> model class: the one place that knows which class builds which ``model_type``."""

from __future__ import annotations

from .ernie4_5 import Ernie4_5ForCausalLM
from .ernie4_5_moe import Ernie4_5_MoeForCausalLM

MODEL_CLASSES: dict[str, type] = {cls.model_type: cls for cls in (Ernie4_5ForCausalLM, Ernie4_5_MoeForCausalLM)}


def model_class_for(config) -> type:
    """The causal-LM class for a transformers config (dense ``ernie4_5`` or MoE ``ernie4_5_moe``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type={model_type!r} is not an ERNIE 4.5 model; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type]
