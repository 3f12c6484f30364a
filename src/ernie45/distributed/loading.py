"""An HF checkpoint loaded straight into a parallel layout, without a whole-model copy on any rank.

The single-process loader's sequence (``ernie45.models.construction.load_pretrained``) with the
layout applied between building on the meta device and allocating: each rank allocates only
its shards, then fills each one with the matching slice read straight from the safetensors files
(rows land in the shard without a temporary where the shard is a range of rows; routed experts
are read per expert, only those owned).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.hf_checkpoint import load_config
from ..models.backend import BackendConfig
from ..models.construction import load_pretrained
from ..models.registry import model_class_for
from .config import ParallelConfig
from .mesh import default_device, ensure_process_group
from .parallelize import parallelize_model


def from_pretrained(
    path: str | Path,
    parallel: ParallelConfig,
    dtype: torch.dtype | str | None = None,
    backend: BackendConfig | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> nn.Module:
    """Load an HF checkpoint directory straight into the layout ``parallel`` (collective)."""
    ensure_process_group()
    config = load_config(path)
    return load_pretrained(
        model_class_for(config),
        path,
        config=config,
        dtype=dtype,
        device=device or default_device(),
        parallelize=partial(parallelize_model, parallel=parallel),
        backend=backend,
        **kwargs,
    )
