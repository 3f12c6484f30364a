"""``ernie45.from_pretrained``: read config.json, pick the dense or MoE class, load."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.hf_checkpoint import load_config
from .models.backend import BackendConfig


def model_class_for(config):
    """The model class for a transformers config (dense ``ernie4_5`` or MoE ``ernie4_5_moe``)."""
    from .models.ernie4_5 import Ernie4_5ForCausalLM

    if config.model_type == "ernie4_5":
        return Ernie4_5ForCausalLM
    if config.model_type == "ernie4_5_moe":
        try:
            from .models.ernie4_5_moe import Ernie4_5_MoeForCausalLM
        except ImportError as err:
            raise NotImplementedError("ERNIE 4.5 MoE checkpoints are not supported yet") from err
        return Ernie4_5_MoeForCausalLM
    raise ValueError(f"model_type={config.model_type!r} is not an ERNIE 4.5 model")


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
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
        from .distributed.loading import from_pretrained as from_pretrained_parallel

        return from_pretrained_parallel(path, parallel, dtype=dtype, backend=backend, device=device, **kwargs)
    config = load_config(path)
    return model_class_for(config).from_pretrained(path, dtype=dtype, backend=backend, device=device, **kwargs)
