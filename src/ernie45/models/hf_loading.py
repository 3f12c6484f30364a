"""transformers' ``from_pretrained`` keywords that code written for it passes, mapped onto ernie45's
(``AutoModelForCausalLM.from_pretrained(name, device_map=..., attn_implementation=...)`` ported
to ``ernie45.from_pretrained`` keeps working), and the hub id or directory it names.

What each becomes: hub keywords (revision, cache_dir, local_files_only, token, force_download)
pick the snapshot; ``device_map`` one device ("auto": the GPU when there is one); ``attn_implementation``
the attention kernel (flash-attention names: sdpa, the same math); ``low_cpu_mem_usage`` and
``trust_remote_code`` change nothing (loading always streams into a meta-built model, and the
model code is ernie45's own). Quantisation and any other keyword are refused by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from ..checkpoint.hub import hub_snapshot, looks_like_hub_id
from .backend import BackendConfig

HUB_KEYWORDS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
NO_EFFECT = ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors")
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flex_attention": "flex", "flash_attention_2": "sdpa", "flash_attention_3": "sdpa"}
QUANTISATION = ("quantization_config", "load_in_8bit", "load_in_4bit")


def checkpoint_path(path: str | Path, hub: dict) -> str | Path:
    """``path`` itself, or the local snapshot of the hub id it names."""
    if looks_like_hub_id(path):
        return hub_snapshot(str(path), repr(str(path)), **hub)
    return path


def take_hub_keywords(kwargs: dict) -> dict:
    """The hub keywords, popped from ``kwargs``."""
    return {name: kwargs.pop(name) for name in HUB_KEYWORDS if name in kwargs}


def take_transformers_keywords(kwargs: dict) -> tuple[dict, torch.device | str | None, str | None]:
    """(hub keywords, the device ``device_map`` names, the kernel ``attn_implementation`` names), popped
    from ``kwargs``; what is left there is for the model's constructor."""
    for name in QUANTISATION:
        if kwargs.get(name):
            raise ValueError(f"from_pretrained({name}=...): ernie45 loads bf16/fp16/fp32 weights only; quantised loading is not supported")
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: ernie45 reads safetensors checkpoints only")
    for name in NO_EFFECT:
        kwargs.pop(name, None)
    hub = take_hub_keywords(kwargs)
    device = device_of_map(kwargs.pop("device_map", None))
    return hub, device, attention_kernel(kwargs.pop("attn_implementation", None))


def attention_kernel(attn_implementation: str | None) -> str | None:
    """ernie45's kernel (``BackendConfig.attn``) for transformers' ``attn_implementation``."""
    if attn_implementation is not None and attn_implementation not in ATTENTION:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not available; choose one of {sorted(ATTENTION)}")
    return ATTENTION.get(attn_implementation)


def device_of_map(device_map) -> torch.device | str | None:
    """The one device a transformers ``device_map`` names ("auto": cuda when available, else cpu)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map spreads the model over {sorted(map(str, devices))}: ernie45 places a model on one device; "
                "use ernie45.distributed (FSDP2, pipeline, tensor parallelism) to split it"
            )
        device_map = devices.pop()
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{device_map}" if isinstance(device_map, int) else device_map


def one_device(device: torch.device | str | None, mapped: torch.device | str | None) -> torch.device | str | None:
    """``device``, or the one ``device_map`` named; both, naming different devices, is an error."""
    if device is not None and mapped is not None and torch.device(device) != torch.device(mapped):
        raise ValueError(f"device={device!r} and device_map (-> {mapped!r}) disagree; give one of them")
    return device if device is not None else mapped


def with_attention(backend: BackendConfig | None, attention: str | None) -> BackendConfig | None:
    """``backend`` with the kernel ``attn_implementation`` asked for (a backend that says otherwise is an error)."""
    if attention is None:
        return backend
    if backend is not None and backend.attn != attention:
        raise ValueError(f"attn_implementation asks for {attention!r} but backend.attn={backend.attn!r}; give one of them")
    return dataclasses.replace(backend or BackendConfig(), attn=attention)


def check_constructor_keywords(cls: type, kwargs: dict, caller: str) -> None:
    """A TypeError naming a keyword neither transformers' loading nor ``cls`` takes."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        takes = ["dtype/torch_dtype", "device", *sorted(accepted), "adapter/peft", "attn_implementation"]
        if caller == "from_pretrained":
            takes += ["device_map", *HUB_KEYWORDS, *NO_EFFECT, "and the config's fields (e.g. max_position_embeddings)"]
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; {cls.__name__} takes {', '.join(takes)}")
