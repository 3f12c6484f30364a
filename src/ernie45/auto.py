"""``ernie45.from_pretrained`` / ``ernie45.from_config``: pick the dense or MoE class from the config."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.hf_checkpoint import load_config
from .models.backend import BackendConfig
from .models.hf_loading import checkpoint_path, take_hub_keywords
from .models.registry import model_class_for


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    backend: BackendConfig | None = None,
    device: torch.device | str | None = None,
    parallel=None,
    adapter: str | Path | None = None,
    peft=None,
    peft_seed: int = 0,
    **kwargs,
):
    """Load any ERNIE 4.5 HF checkpoint (a directory or a hub id) with the right model class; takes
    transformers' loading keywords too (``device_map``, ``attn_implementation``, ``revision``, ...) and,
    as transformers, config fields to override (``rope_parameters={...}``, ``max_position_embeddings=``).

    ``parallel``: an ``ernie45.distributed.ParallelConfig`` to load each rank's shards straight
    into that layout (under torchrun); None loads the whole model here.
    ``adapter``: a PEFT LoRA adapter directory to add (ours or PEFT's); ``peft``: an
    ``ernie45.peft.PeftConfig`` (or its keys as a dict) for new adapters drawn from ``peft_seed``.
    Either freezes the base weights (see ``ernie45.peft``).
    """
    path = checkpoint_path(path, take_hub_keywords(kwargs))  # NOTE: a hub id becomes its local snapshot
    adapters = _adapter_setup(peft, adapter, peft_seed)
    if adapters is not None:
        kwargs["adapters"] = adapters
    if parallel is not None:
        # NOTE: imported here so that `import ernie45` does not pull in torch.distributed's wrappers.
        from .distributed.loading import from_pretrained as from_pretrained_parallel

        return from_pretrained_parallel(path, parallel, dtype=dtype, backend=backend, device=device, **kwargs)
    config = load_config(path)
    return model_class_for(config).from_pretrained(path, dtype=dtype, backend=backend, device=device, config=config, **kwargs)


def from_config(
    config,
    backend: BackendConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    peft=None,
    peft_seed: int = 0,
    **kwargs,
):
    """A randomly initialised model of the class ``config.model_type`` names (transformers' init);
    ``peft``: add new LoRA adapters as ``from_pretrained`` does."""
    adapters = _adapter_setup(peft, None, peft_seed)
    if adapters is not None:
        kwargs["adapters"] = adapters
    return model_class_for(config).from_config(config, backend=backend, dtype=dtype, device=device, **kwargs)


def _adapter_setup(peft, adapter, seed: int):
    # NOTE: imported here: `import ernie45` stays free of the adapter code until it is asked for.
    from .peft.setup import adapter_setup

    return adapter_setup(peft, adapter, seed)
