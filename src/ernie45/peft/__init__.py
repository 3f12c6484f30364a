"""LoRA fine-tuning, routed experts included, with adapters HF PEFT loads (and PEFT's loaded here).

    from ernie45.peft import PeftConfig, apply_lora, init_lora, save_adapter, load_adapter, merge
    model = ernie45.from_pretrained(base, peft=PeftConfig(target_modules=["*"], dim=16))  # adapters drawn
    ...train only ernie45.peft.adapter_parameters(model)...
    save_adapter(model, "out/adapter")            # PeftModel.from_pretrained(hf_model, "out/adapter")
    model = ernie45.from_pretrained(base, adapter="out/adapter"); merge(model).save_pretrained("merged")
"""

from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter, save_adapter
from .config import PeftConfig
from .lora import (
    LoRALinear,
    adapter_parameters,
    adapters_disabled,
    apply_lora,
    count_parameters,
    has_adapters,
    init_lora,
    merge,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRALinear",
    "PeftConfig",
    "adapter_parameters",
    "adapters_disabled",
    "apply_lora",
    "count_parameters",
    "has_adapters",
    "init_lora",
    "load_adapter",
    "merge",
    "read_adapter",
    "save_adapter",
]
