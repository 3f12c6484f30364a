"""Which part of a (possibly sharded) tensor this rank holds, for code on both sides of the model.

A plain tensor is held whole; a DTensor (FSDP2, TP, EP) holds one box of the global tensor. The
model code (grouped experts), the checkpoint loader and the consolidated save all ask these.

``torch.distributed.tensor`` is imported only where a DTensor can exist: importing it pulls in
sympy and costs ~40 MB of host memory and ~0.5 s, which a single-process run never needs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor; False, without importing DTensor, while nothing has (then none exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: the local shard of a DTensor, a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_box(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's box of the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def local_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The slices of the global tensor this rank holds (None: a plain tensor, all of it)."""
    if not is_dtensor(tensor):
        return None
    shape, offset = local_box(tensor)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))
