"""``ernie45.from_pretrained`` / ``ernie45.from_config``: pick the dense or MoE class from the config."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.hf_checkpoint import load_config
from .models.backend import BackendConfig
from .models.registry import model_class_for


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    backend: BackendConfig | None = None,
    device: torch.device | str | None = None,
    parallel=None,
    **kwargs,
):
    """Load any ERNIE 4.5 HF checkpoint directory with the right model class.

    ``parallel``: an ``ernie45.distributed.ParallelConfig`` to load each rank's shards straight
    into that layout (under torchrun); None loads the whole model here.
    """
    if parallel is not None:
        # NOTE: imported here so that `import ernie45` does not pull in torch.distributed's wrappers.
        from .distributed.loading import from_pretrained as from_pretrained_parallel

        return from_pretrained_parallel(path, parallel, dtype=dtype, backend=backend, device=device, **kwargs)
    cls = model_class_for(load_config(path))
    return cls.from_pretrained(path, dtype=dtype, backend=backend, device=device, **kwargs)


def from_config(
    config,
    backend: BackendConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **kwargs,
):
    """A randomly initialised model of the class ``config.model_type`` names (transformers' init)."""
    return model_class_for(config).from_config(config, backend=backend, dtype=dtype, device=device, **kwargs)
