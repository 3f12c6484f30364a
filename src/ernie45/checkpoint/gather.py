"""A parallelised model's tensors gathered whole onto rank 0, one tensor at a time (collective).

Only torch.distributed, DTensor and ``ernie45.sharding`` are used here, so the model's own
``save_pretrained`` can save a sharded model without model code importing ``ernie45.distributed``:
each rank sends the box of the global tensor it holds, rank 0 assembles it, and no rank ever holds
more than one whole tensor beyond its shards.
"""

from __future__ import annotations

import math
import pickle

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..sharding import local_box, local_part


def is_parallel(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether any tensor is sharded over ranks (a DTensor): saving it is then collective."""
    return any(isinstance(tensor, DTensor) for tensor in tensors.values())


def gather_on_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole value of ``tensor`` on rank 0, None elsewhere (collective for a DTensor).

    Each rank sends the box of the global tensor it holds (padded to the largest box, as
    ``gather`` wants equal sizes), so only rank 0 ever holds the whole tensor.
    """
    if not isinstance(tensor, DTensor):
        return tensor.detach() if dist.get_rank() == 0 else None
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, local_box(tensor))
    local = local_part(tensor).detach().reshape(-1)
    send = local.new_zeros(max(math.prod(box_shape) for box_shape, _ in boxes))
    send[: local.numel()] = local
    received = [torch.empty_like(send) for _ in boxes] if dist.get_rank() == 0 else None
    dist.gather(send, received, dst=0)
    if received is None:
        return None
    full = send.new_empty(tensor.shape)
    for (box_shape, box_offset), flat in zip(boxes, received):
        box = tuple(slice(start, start + size) for start, size in zip(box_offset, box_shape))
        full[box] = flat[: math.prod(box_shape)].view(box_shape)
    return full


def failure_from_rank0(failure: Exception | None) -> Exception | None:
    """Rank 0's ``failure`` (or None) on every rank, so that all of them raise the same error.

    Every rank waits here until rank 0 is done, so this is also the save's closing barrier.
    """
    try:
        pickle.dumps(failure)
    except Exception:  # NOTE: an exception that cannot travel is sent as its message
        failure = RuntimeError(f"saving failed on rank 0: {failure}")
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    return box[0]
