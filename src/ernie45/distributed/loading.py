"""An HF checkpoint loaded straight into a parallel layout, without a whole-model copy on any rank.

Build the model on the meta device, lay it out (TP/EP/FSDP2), allocate only this rank's shards,
then fill each one with the matching slice read straight from the safetensors files
(``read_native_into(..., index=...)``: rows land in the shard without a temporary or a memory
map where the shard is a range of rows; routed experts are read per expert, only those owned).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..auto import model_class_for
from ..checkpoint.hf_adapter import hf_keys, read_native_into
from ..checkpoint.hf_checkpoint import _check_key_sets, checkpoint_dtype, load_config, native_tensors
from ..checkpoint.safetensors_io import CheckpointFiles
from ..generation import load_generation_config
from ..models.backend import BackendConfig
from ..models.causal_lm import _building
from .config import ParallelConfig, check_model_fits
from .mesh import default_device, ensure_process_group
from .model_parts import is_tied
from .parallelize import parallelize_model


def local_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The slices of the global tensor that this rank holds (None: a plain tensor, all of it)."""
    if not isinstance(tensor, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def load_hf_shards(model: nn.Module, files: CheckpointFiles) -> None:
    """Fill every parameter/buffer's local part (already allocated) with its slice of ``files``."""
    targets = native_tensors(model)
    expected = {key for name, t in targets.items() for key in hf_keys(name, tuple(t.shape))}
    _check_key_sets(files, expected, is_tied(model))
    for name, target in targets.items():
        read_native_into(files, name, tuple(target.shape), local_part(target), local_index(target))
    files.close()


def from_pretrained(
    path: str | Path,
    parallel: ParallelConfig,
    dtype: torch.dtype | None = None,
    backend: BackendConfig | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> nn.Module:
    """Load an HF checkpoint directory straight into the layout ``parallel`` (collective)."""
    ensure_process_group()
    config = load_config(path)
    cls = model_class_for(config)
    cls._check_config(config)
    check_model_fits(parallel, config)
    files = CheckpointFiles(path)
    with _building(dtype or checkpoint_dtype(files), "meta"):
        model = cls(config, backend=backend, **kwargs)
    parallelize_model(model, parallel)
    model.to_empty(device=device or default_device())
    model.tie_weights()
    load_hf_shards(model, files)
    model.materialize_buffers()
    model.generation_config = load_generation_config(path)  # as the single-process from_pretrained
    return model.eval()
