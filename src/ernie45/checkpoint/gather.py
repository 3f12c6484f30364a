"""A parallelised model's tensors gathered whole onto rank 0, one tensor at a time (collective).

Only torch.distributed, DTensor and ``ernie45.sharding`` are used here, so the model's own
``save_pretrained`` can save a sharded model without model code importing ``ernie45.distributed``:
each rank sends the box of the global tensor it holds, rank 0 assembles it, and no rank ever holds
more than one whole tensor beyond its shards. A model holding some pipeline stages (``model.pipeline``
set) gathers every stage's tensors the same way, in the order a single-process save writes them.
"""

from __future__ import annotations

import math
import pickle
import re

import torch
import torch.distributed as dist
from torch import nn

from ..sharding import is_dtensor, local_box, local_part

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_parallel(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether any tensor is sharded over ranks (a DTensor): saving it is then collective."""
    return any(is_dtensor(tensor) for tensor in tensors.values())


def gather_on_rank0(tensor: torch.Tensor, replicated: bool = True) -> torch.Tensor | None:
    """The whole value of ``tensor`` on rank 0, None elsewhere (collective unless ``replicated``
    lets a plain tensor count as rank 0's own).

    Each rank sends the box of the global tensor it holds (padded to the largest box, as
    ``gather`` wants equal sizes), so only rank 0 ever holds the whole tensor. A meta tensor
    stands for one this rank does not hold (another pipeline stage does) and sends nothing;
    with ``replicated=False`` (pipeline stages hold different plain tensors) a plain tensor is
    sent whole, by the first rank holding it.
    """
    if replicated and not is_dtensor(tensor):
        return tensor.detach() if dist.get_rank() == 0 else None
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, _held_box(tensor))
    senders = _senders(boxes)
    local = local_part(tensor).detach().reshape(-1)
    device = local.device if not tensor.is_meta else _communication_device()
    send = torch.zeros(max(math.prod(boxes[r][0]) for r in senders), dtype=tensor.dtype, device=device)
    if dist.get_rank() in senders:
        send[: local.numel()] = local
    received = [torch.empty_like(send) for _ in boxes] if dist.get_rank() == 0 else None
    dist.gather(send, received, dst=0)
    if received is None:
        return None
    full = send.new_empty(tensor.shape)
    for rank in senders:
        box_shape, box_offset, _ = boxes[rank]
        box = tuple(slice(start, start + size) for start, size in zip(box_offset, box_shape))
        full[box] = received[rank][: math.prod(box_shape)].view(box_shape)
    return full


def _held_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
    """(shape, offset, whole) of what this rank holds of ``tensor``; None for a meta placeholder."""
    if tensor.is_meta:
        return None
    if is_dtensor(tensor):
        return (*local_box(tensor), False)
    return tuple(tensor.shape), (0,) * tensor.dim(), True


def _senders(boxes: list) -> list[int]:
    """The ranks that send their box: all DTensor holders, and the first rank holding a whole tensor."""
    wholes = [rank for rank, box in enumerate(boxes) if box is not None and box[2]]
    return [rank for rank, box in enumerate(boxes) if box is not None and (not box[2] or rank == wholes[0])]


def _communication_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_stage_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pipeline stage's tensors in the order a single-process save writes them: this rank's
    own, the other stages' as meta tensors of their global shape and dtype (collective).

    A tied LM head's copy on the last stage is left out: a tied checkpoint stores the embedding only.
    """
    buffers = {name for name, _ in model.named_buffers()}
    mine = [(name, tuple(t.shape), t.dtype, name in buffers) for name, t in tensors.items()]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    specs: dict[str, tuple] = {}
    for rank_specs in every:
        for name, shape, dtype, is_buffer in rank_specs:
            specs.setdefault(name, (shape, dtype, is_buffer))
    if getattr(model.config, "tie_word_embeddings", False):
        specs.pop("lm_head.weight", None)
    order = sorted(specs, key=lambda name: save_order(name, specs[name][2]))
    return {
        name: tensors[name] if name in tensors else torch.empty(specs[name][0], dtype=specs[name][1], device="meta")
        for name in order
    }


def save_order(name: str, is_buffer: bool) -> tuple[int, ...]:
    """Where ``name`` comes in a single-process save (``native_tensors``' order): parameters before
    buffers, each in module order: embedding, layers by index, final norm, LM head. A stable sort
    by it keeps each layer's tensors in their module order."""
    layer = _LAYER.match(name)
    if layer:
        section = (1, int(layer[1]))
    elif name.startswith("model.embed_tokens."):
        section = (0, 0)
    elif name.startswith("lm_head."):
        section = (3, 0)
    else:
        section = (2, 0)  # the final norm
    return (int(is_buffer), *section)


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
