"""NeMo AutoModel's recipe files, run as they are: what of them cannot run here becomes the nearest
thing that can, with one notice line naming both (``--strict`` makes each an error instead).

This works on the raw mapping, after the ``--a.b=v`` overrides and before validation, because
what it changes are names the typed sections would refuse (a Transformer Engine loss, a ``ci:``
block). Everything else AutoModel writes is a key of the typed sections themselves.

  * ``ci:`` (AutoModel's CI settings): dropped.
  * ``model.backend`` (or a top-level ``backend``): a kernel ``BackendConfig`` refuses here (``attn:
    te``, ``dispatcher: deepep``, ``experts: gmm``, ...) -> the nearest one ernie45 implements.
    ``BackendConfig`` itself stays strict: only recipes get the fallback. A kernel it accepts is
    used as given, so an integration added later is never silently replaced.
  * ``model.attn_implementation`` (transformers' keyword in AutoModel's dense recipes): the
    backend's ``attn`` unless the backend names one (a value ernie45 lacks, e.g.
    ``flash_attention_2``, falls back as above).
  * ``model.use_liger_kernel``, ``use_sdpa_patching``, ``sdpa_method``, ``trust_remote_code``,
    ``force_hf`` (AutoModel's loading switches for transformers' model code): dropped with a notice,
    ernie45 runs its own model.
  * other ``model.`` keys that name fields of transformers' ERNIE 4.5 configs (AutoModel forwards them
    to transformers' ``from_pretrained``, which sets them on the config, e.g. ``rope_scaling``):
    moved into ``model.config``, where ernie45 takes config fields.
  * ``dist_env.backend: nccl`` where torch sees no CUDA GPU -> gloo.
  * ``loss_fn``: TEParallelCrossEntropy (Transformer Engine) and ChunkedCrossEntropy -> MaskedCrossEntropy
    (the same summed cross-entropy).
  * ``distributed.dp_size: none`` (a string in AutoModel's YAML) -> null (fill the world).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.distributed as dist

from ..models.backend import BackendConfig
from ..models.construction import is_config_field
from .config import ModelConfig
from .loss import MaskedCrossEntropy
from .registry import COMPONENTS

# BackendConfig field -> {value ernie45 lacks: the nearest value it implements}
NEAREST_KERNEL: dict[str, dict[Any, Any]] = {
    "attn": {"te": "sdpa", "tilelang": "sdpa", "cudnn": "sdpa", "magi": "sdpa", "flash_attention_2": "sdpa"},
    "linear": {"te": "torch"},
    "rms_norm": {"te": "torch_fp32"},
    "experts": {"te": "torch_mm", "gmm": "torch_mm", "torch_mm_mxfp8": "torch_mm"},
    "dispatcher": {"deepep": "torch", "hybridep": "torch", "uccl_ep": "torch"},
    "rope_fusion": {True: False},
    "enable_fsdp_optimizations": {True: False},
}
_MASKED_CE = next(c.name for c in COMPONENTS["loss_fn"] if c.target is MaskedCrossEntropy)
_NEMO_LOSS = "nemo_automodel.components.loss"
# loss_fn _target_ -> (the loss used instead, why)
NEAREST_LOSS: dict[str, tuple[str, str]] = {
    f"{_NEMO_LOSS}.te_parallel_ce.TEParallelCrossEntropy": (_MASKED_CE, "it needs Transformer Engine"),
    f"{_NEMO_LOSS}.chunked_ce.ChunkedCrossEntropy": (_MASKED_CE, "ernie45 computes the same loss unchunked"),
}


# AutoModel's from_pretrained switches for patching transformers' model code -> why they do nothing here
UNUSED_LOADING_KEYS: dict[str, str] = {
    "use_liger_kernel": "Liger kernels patch transformers' model code; ernie45 has its own fused loss and kernels",
    "use_sdpa_patching": "it patches transformers' attention; ernie45's attention kernel is the backend's attn",
    "sdpa_method": "it patches transformers' attention; ernie45's attention kernel is the backend's attn",
    "trust_remote_code": "ernie45 runs its own ERNIE 4.5 code, never a checkpoint's",
    "force_hf": "ernie45 always runs its own ERNIE 4.5 model",
}


class Adapter:
    """Collects the notices of one recipe; ``strict`` turns each fallback into an error."""

    def __init__(self, strict: bool, error: type[Exception]):
        self.strict = strict
        self.error = error
        self.notices: list[str] = []

    def fall_back(self, key: str, given: Any, used: Any, why: str) -> Any:
        """``used`` in place of ``given`` at ``key`` (noted), or the error under --strict."""
        if self.strict:
            raise self.error(f"{key}={given!r} cannot run here ({why}); without --strict ernie45 uses {used!r} instead")
        self.notices.append(f"notice: {key}: using {used!r} instead of {given!r} ({why}); --strict makes this an error")
        return used

    def note(self, message: str) -> None:
        self.notices.append(f"notice: {message}")


def adapt_recipe(raw: dict[str, Any], strict: bool, error: type[Exception] = ValueError) -> tuple[dict[str, Any], list[str]]:
    """A copy of the raw recipe with AutoModel's names and unavailable components mapped (module
    docstring), and the notice lines to print once. ``error``: raised for a fallback under ``strict``."""
    raw = copy.deepcopy(raw)
    adapter = Adapter(strict, error)
    if "ci" in raw:
        raw.pop("ci")
        adapter.note("ci: AutoModel's CI settings are not used by ernie45 (ignored)")
    _attn_implementation(raw, adapter)
    _model_keywords(raw, adapter)
    _backend_kernels(raw, adapter)
    _dist_backend(raw, adapter)
    _loss(raw, adapter)
    distributed = raw.get("distributed")
    if isinstance(distributed, dict) and str(distributed.get("dp_size")).lower() == "none":
        distributed["dp_size"] = None
    return raw, adapter.notices


def _backend_section(raw: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(where, the backend mapping) of a recipe: top-level ``backend`` or ``model.backend``."""
    if isinstance(raw.get("backend"), dict):
        return "backend", raw["backend"]
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("backend"), dict):
        return "model.backend", model["backend"]
    return None


def _attn_implementation(raw: dict[str, Any], adapter: Adapter) -> None:
    """transformers' ``model.attn_implementation`` becomes the backend's ``attn``; a backend that names
    its own ``attn`` decides (as in AutoModel, whose own model classes read only the backend)."""
    model = raw.get("model")
    if not (isinstance(model, dict) and "attn_implementation" in model):
        return
    kernel = model.pop("attn_implementation")
    found = _backend_section(raw)
    if found is None:
        model["backend"] = {"attn": kernel}
    elif "attn" not in found[1]:
        found[1]["attn"] = kernel
    elif found[1]["attn"] != kernel:
        adapter.note(f"model.attn_implementation={kernel!r} is not used: {found[0]}.attn={found[1]['attn']!r} chooses the attention kernel")


def _model_keywords(raw: dict[str, Any], adapter: Adapter) -> None:
    """AutoModel's loading switches dropped; transformers config fields moved into ``model.config``."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return
    for key in [key for key in model if key in UNUSED_LOADING_KEYS]:
        adapter.note(f"model.{key}={model.pop(key)!r} is not used ({UNUSED_LOADING_KEYS[key]})")
    fields = [key for key in model if key not in ModelConfig.model_fields and key != "_target_" and _config_field(key)]
    if not fields:
        return
    config = model.setdefault("config", {})
    if not isinstance(config, dict):
        return  # the typed section names the wrong type
    for key in fields:
        if key in config:
            raise adapter.error(f"model.{key} and model.config.{key} are both given; keep one")
        config[key] = model.pop(key)
        adapter.note(f"model.{key}: set on the model's config (as model.config.{key}), as transformers' from_pretrained does")


def _config_field(key: str) -> bool:
    """A field of transformers' dense or MoE ERNIE 4.5 config (``max_position_embeddings``, ...), or the
    legacy ``rope_scaling`` transformers still reads."""
    return any(is_config_field(config, key) for config in _default_configs())


@functools.cache
def _default_configs() -> tuple:
    from transformers import Ernie4_5Config, Ernie4_5_MoeConfig

    return Ernie4_5Config(), Ernie4_5_MoeConfig()


def _refusal(field: str, value: Any) -> str | None:
    """Why ``BackendConfig`` refuses ``field=value`` here (None when it accepts it)."""
    try:
        BackendConfig(**{field: value})
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _backend_kernels(raw: dict[str, Any], adapter: Adapter) -> None:
    found = _backend_section(raw)
    if found is None:
        return
    where, backend = found
    for field, nearest in NEAREST_KERNEL.items():
        value = backend.get(field)
        if isinstance(value, (str, bool)) and value in nearest:
            why = _refusal(field, value)
            if why is not None:
                backend[field] = adapter.fall_back(f"{where}.{field}", value, nearest[value], why)


def _dist_backend(raw: dict[str, Any], adapter: Adapter) -> None:
    dist_env = raw.get("dist_env")
    if not (isinstance(dist_env, dict) and dist_env.get("backend") == "nccl"):
        return
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        dist_env["backend"] = adapter.fall_back("dist_env.backend", "nccl", "gloo", "torch sees no CUDA GPU here")


def _loss(raw: dict[str, Any], adapter: Adapter) -> None:
    section = raw.get("loss_fn")
    if not (isinstance(section, dict) and section.get("_target_") in NEAREST_LOSS):
        return
    used, why = NEAREST_LOSS[section["_target_"]]
    target = adapter.fall_back("loss_fn._target_", section["_target_"], used, why)
    raw["loss_fn"] = {"_target_": target}  # NOTE: the replaced loss's own keys (chunk_len, ...) do not apply
