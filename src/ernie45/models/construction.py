"""The one way a model is built: from a config (random init) or from an HF checkpoint directory.

``load_pretrained`` is shared by the single-process and the parallel loaders:
build on the meta device -> (lay out over the ranks) -> allocate -> fill from the safetensors.
Single process: tensors are read straight into place (no random init, no second copy). Parallel:
``parallelize`` (from ``ernie45.distributed``, passed in: model code never imports it) shards the
meta model, each rank allocates only its shards and reads only their bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..checkpoint.hf_checkpoint import CheckpointFiles, checkpoint_dtype, load_config, load_hf_weights
from ..dtypes import as_dtype, config_dtype, dtype_argument, named_dtype
from ..generation import load_generation_config
from .dimensions import head_dim_of
from .hf_loading import (
    attention_kernel,
    check_constructor_keywords,
    checkpoint_path,
    one_device,
    take_transformers_keywords,
    with_attention,
)
from .rope import rope_theta
from .validation import check_model_config

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def building(dtype: torch.dtype, device: torch.device | str | None) -> Iterator[None]:
    """Create modules with ``dtype`` as the default float dtype on ``device``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


class Adapters(Protocol):
    """Extra tensors added during the build (``ernie45.peft.setup.AdapterSetup``: LoRA adapters)."""

    def add(self, model: nn.Module) -> None:
        """Create them on the (meta) model, before it is laid out over ranks."""

    def fill(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """Give them their values once the base weights are in place."""


def check_config(cls: type, config) -> None:
    """Refuse a config ``cls`` cannot build, naming the value (before any tensor is allocated)."""
    if getattr(config, "model_type", None) != cls.model_type:
        raise ValueError(
            f"{cls.__name__} needs a config with model_type={cls.model_type!r}, got "
            f"{getattr(config, 'model_type', None)!r}; use ernie45.from_pretrained to pick the class"
        )
    check_model_config(config)
    if head_dim_of(config) % 2:  # NOTE: also when derived as hidden_size / num_attention_heads
        raise ValueError(f"head_dim={head_dim_of(config)} must be even for rotary embeddings")


def build(
    cls: type,
    config,
    dtype: torch.dtype | str | None = None,
    device=None,
    torch_dtype=None,
    adapters: Adapters | None = None,
    **kwargs,
) -> nn.Module:
    """A randomly initialised ``cls(config, **kwargs)`` in ``dtype`` (default: the config's) on ``device``;
    transformers' ``attn_implementation`` names the attention kernel, as in ``from_pretrained``."""
    kwargs["backend"] = with_attention(kwargs.get("backend"), attention_kernel(kwargs.pop("attn_implementation", None)))
    check_constructor_keywords(cls, kwargs, "from_config")
    check_config(cls, config)
    with building(as_dtype(dtype_argument(dtype, torch_dtype)) or config_dtype(config), device):
        model = cls(config, **kwargs)
    model.init_weights()
    if adapters is not None:
        adapters.add(model)
        adapters.fill(model, device)
    return model


def is_config_field(config, key: str) -> bool:
    """``key`` is a setting of the transformers ``config`` (a field, or the legacy ``rope_scaling``), not a method."""
    return hasattr(config, key) and not callable(getattr(config, key))


def take_config_keywords(cls: type, config, kwargs: dict) -> dict:
    """Pop the keywords that name fields of ``config`` (and not ``cls``'s own arguments): transformers'
    ``from_pretrained(path, max_position_embeddings=..., rope_parameters=...)`` sets them on the config."""
    own = set(inspect.signature(cls.__init__).parameters)
    fields = [key for key in kwargs if key not in own and is_config_field(config, key)]
    return {key: kwargs.pop(key) for key in fields}


def with_overrides(config, overrides: dict):
    """A copy of ``config`` with ``overrides``, built again so transformers checks and standardizes them
    (a legacy ``rope_scaling`` becomes ``rope_parameters``); the values are checked as a file's are."""
    if not overrides:
        return config
    if "rope_scaling" in overrides:
        if "rope_parameters" in overrides:
            raise ValueError("rope_scaling and rope_parameters are both given; pass rope_parameters only")
        overrides = {key: value for key, value in overrides.items() if key != "rope_scaling"} | {
            "rope_parameters": scaled_rope(config, overrides["rope_scaling"])
        }
    try:
        return type(config).from_dict({**config.to_dict(), **overrides})
    except (StrictDataclassError, ValueError, TypeError, KeyError) as err:
        given = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        raise ValueError(f"from_pretrained({given}): {' '.join(str(err).split())}") from None


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def layers_beyond(count: int, stored: int) -> Callable[[str], bool] | None:
    """With ``num_hidden_layers=count`` below the checkpoint's ``stored``: the HF keys of the layers
    not loaded (transformers loads the first layers too, as a debugging or pruning shortcut)."""
    if count >= stored:
        return None
    logger.info("loading the first %d of the checkpoint's %d layers (num_hidden_layers=%d)", count, stored, count)
    return lambda key: (match := _LAYER_KEY.match(key)) is not None and int(match[1]) >= count


def scaled_rope(config, rope_scaling: dict | None) -> dict:
    """transformers 4's ``rope_scaling={"type": ..., "factor": ...}`` as ``rope_parameters`` on the
    config's own RoPE base (transformers 5 would take the default base instead)."""
    scaling = {key: value for key, value in (rope_scaling or {}).items() if key != "type"}
    scaling.setdefault("rope_type", (rope_scaling or {}).get("type") or "default")
    return {"rope_theta": rope_theta(config), **scaling}


def load_pretrained(
    cls: type,
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    parallelize: Callable[[nn.Module], object] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    adapters: Adapters | None = None,
    config=None,
    **kwargs,
) -> nn.Module:
    """``cls`` loaded from an HF checkpoint directory. dtype (or ``torch_dtype``) defaults as
    transformers' ``dtype="auto"`` (its default): the one config.json names, else the weights'.

    ``path``: a checkpoint directory or a hub id (``hf_loading.py``, with transformers' other
    loading keywords). ``config``: a transformers config to build instead of the directory's
    config.json (as transformers' ``config=``; ``ernie45.from_pretrained`` passes the one it has read).
    Keywords naming config fields override them, as in transformers (``max_position_embeddings=``,
    ``rope_parameters=`` for context extension, ``num_hidden_layers=`` to load the first layers).

    ``parallelize(model)`` lays the meta model out over the ranks before anything is allocated;
    ``adapters`` are added before that and filled after the base weights are loaded.
    """
    hub, mapped_device, attention = take_transformers_keywords(kwargs)
    path = checkpoint_path(path, hub)
    device = one_device(device, mapped_device)
    kwargs["backend"] = with_attention(kwargs.get("backend"), attention)
    config = load_config(path) if config is None else config
    stored_layers = config.num_hidden_layers
    config = with_overrides(config, take_config_keywords(cls, config, kwargs))
    check_constructor_keywords(cls, kwargs, "from_pretrained")
    check_config(cls, config)
    files = CheckpointFiles(path)
    default = named_dtype(config) or checkpoint_dtype(files)
    with building(as_dtype(dtype_argument(dtype, torch_dtype)) or default, "meta"):
        model = cls(config, **kwargs)
    if adapters is not None:
        adapters.add(model)
    if parallelize is not None:
        parallelize(model)
        model.to_empty(device=device or "cpu")  # only this rank's shards
        model.tie_weights()
    load_hf_weights(model, files, device=device or "cpu", unused=layers_beyond(config.num_hidden_layers, stored_layers))
    if adapters is not None:
        adapters.fill(model, device or "cpu")
    model.materialize_buffers()
    model.tie_weights()
    model.generation_config = load_generation_config(path)  # end/pad tokens for generate
    return model.eval()
