"""The consolidated HF checkpoint of a parallel model, without gathering the model on one rank.

The ranks gather one tensor at a time onto rank 0 (each sends the box of the global tensor it
holds), which converts it to the HF layout and streams it into the current shard file: rank 0
holds at most one tensor and one shard file, the other ranks nothing beyond their shards. The
files are the ones a single-process ``save_pretrained`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import GenerationConfig

from ..checkpoint.hf_adapter import to_hf
from ..checkpoint.hf_checkpoint import native_tensors
from ..checkpoint.safetensors_io import AtomicDirectory, write_safetensors_stream


def _hf_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """(HF key, bytes) of every tensor the checkpoint will hold, from global shapes (no data)."""
    sizes = []
    for name, tensor in native_tensors(model).items():
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        sizes += [(key, part.numel() * part.element_size()) for key, part in to_hf(name, meta)]
    return sizes


def gather_on_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole value of ``tensor`` on rank 0, None elsewhere (collective for a DTensor).

    Each rank sends the box of the global tensor it holds (padded to the largest box, as
    ``gather`` wants equal sizes), so only rank 0 ever holds the whole tensor.
    """
    if not isinstance(tensor, DTensor):
        return tensor.detach() if dist.get_rank() == 0 else None
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, (shape, offset))
    local = tensor.to_local().detach().reshape(-1)
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


def _gathered_hf_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, full CPU tensor) in checkpoint order on rank 0; nothing elsewhere. Every rank must
    exhaust it: each native tensor is gathered collectively when its turn comes."""
    for name, tensor in native_tensors(model).items():
        full = gather_on_rank0(tensor)
        if full is None:
            continue
        for key, part in to_hf(name, full.cpu()):
            # NOTE: a view (one expert of a layer) would keep the whole layer alive until its
            # shard file is written; a copy of just the part lets the layer go now.
            yield key, part if part.untyped_storage().nbytes() == part.nbytes else part.clone()
        del full


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write the consolidated HF checkpoint of a parallelised model from rank 0 (collective)."""
    items = _gathered_hf_items(model)
    if dist.get_rank() == 0:
        config = model.config
        config.dtype = model.get_input_embeddings().weight.dtype
        with AtomicDirectory(path) as tmp:
            config.save_pretrained(str(tmp))
            GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
            write_safetensors_stream(tmp, _hf_sizes(model), items, max_shard_size)
    for _ in items:  # other ranks: take part in every gather; rank 0: nothing left
        pass
    dist.barrier()
