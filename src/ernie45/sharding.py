"""Which part of a (possibly sharded) tensor this rank holds, for code on both sides of the model.

A plain tensor is held whole; a DTensor (FSDP2, TP, EP) holds one box of the global tensor. The
model code (grouped experts), the checkpoint loader and the consolidated save all ask these.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: the local shard of a DTensor, a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_box(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's box of the global tensor."""
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def local_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The slices of the global tensor this rank holds (None: a plain tensor, all of it)."""
    if not isinstance(tensor, DTensor):
        return None
    shape, offset = local_box(tensor)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))
