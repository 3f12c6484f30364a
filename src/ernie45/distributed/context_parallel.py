"""Context parallelism: one long sequence split over the ``cp`` ranks, attention by all-gathered K/V.

Shapes: B batch, S the whole (padded) sequence, N = cp ranks, L = S / (2N) tokens per chunk.

    sequence  [B,S] -> 2N chunks; rank r holds chunks r and 2N-1-r ("zigzag": every rank gets an
                       early and a late chunk, so causal attention costs every rank the same)
    each rank [B,2L]   embeds, norms, MLP / MoE its own tokens only (activations are 1/N)
    attention          q: the rank's tokens; k, v: all-gathered from the cp group in rank order
                       (``all_gather_tensor_autograd``: the backward reduce-scatters their grads);
                       the mask [B,1,2L,S] says which gathered key each local query may see, by
                       GLOBAL token index (causal), padding and documents (packed rows)
    RoPE               the global positions of the rank's tokens (given as ``position_ids``)
    loss               labels shifted globally before the split (``shift_labels``), so a chunk's
                       last token is scored against the next chunk's first

The model code is unchanged: ``shard_sequence`` prepares each rank's inputs (ids, global positions,
the 4-D mask, the padding and shifted labels) and ``apply_context_parallel`` gives every attention
layer a kernel that gathers K/V first. Parameters are FSDP-sharded over ``dp_shard x cp`` (cp folds
into the shard group, as in torchtitan), which also sums their gradients over the cp ranks.
NOTE: K/V of the whole sequence are held (one layer at a time); a ring exchange would hold 2 chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from ..models.attention import Ernie4_5Attention, document_starts, sdpa_attention
from ..models.loss import IGNORE_INDEX
from ..models.rope import LENGTH_DEPENDENT_ROPE, RotaryEmbedding
from .config import LayoutError


def zigzag_index(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[2L] global token indices rank ``cp_rank`` holds: chunks ``r`` and ``2N-1-r`` of ``2N``."""
    chunk = seq_len // (2 * cp_size)
    first, last = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk), torch.arange(last * chunk, (last + 1) * chunk)])


def gathered_index(seq_len: int, cp_size: int) -> torch.Tensor:
    """[S] global token index of each position of the all-gathered keys (rank 0's tokens first)."""
    return torch.cat([zigzag_index(seq_len, cp_size, r) for r in range(cp_size)])


@dataclass(frozen=True)
class SequenceShard:
    """One cp rank's share of a batch: the model's inputs and the labels its loss uses."""

    input_ids: torch.Tensor  # [B,2L]
    position_ids: torch.Tensor  # [B,2L] global positions (RoPE)
    attention_mask: torch.Tensor  # [B,1,2L,S] bool: which all-gathered keys each local query sees
    padding_mask: torch.Tensor  # [B,2L] True = padding (skips the routed experts, no loss)
    shift_labels: torch.Tensor  # [B,2L] the label of the NEXT global token (-100: none)
    index: torch.Tensor  # [2L] global token indices of this shard (to put outputs back in order)


def _padded(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    extra = length - tensor.shape[1]
    return tensor if extra == 0 else torch.cat([tensor, tensor.new_full((tensor.shape[0], extra), value)], dim=1)


def shard_sequence(
    input_ids: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_id: int = 0,
) -> SequenceShard:
    """Rank ``cp_rank``'s share of ``input_ids`` [B,S] (padded at the end to a multiple of 2N).

    ``attention_mask`` [B,S] is HF's (1 = real token); ``position_ids`` [B,S] may restart per document
    (packed rows: documents are kept apart across chunks); ``labels`` [B,S] unshifted, -100 = ignore.
    """
    batch, seq = input_ids.shape
    length = -(-seq // (2 * cp_size)) * (2 * cp_size)
    keep = _padded(attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool), length, False)
    if position_ids is None:
        position_ids = (torch.cumsum(keep[:, :seq], dim=1) - 1).clamp(min=0)
    positions = _padded(position_ids.expand(batch, -1), length, 0)
    documents = _document_ids(positions, keep)
    shifted = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    if labels is not None:
        shifted[:, : seq - 1] = labels[:, 1:]
        shifted[~keep] = IGNORE_INDEX
        # NOTE: the last token of a document predicts nothing (the next token belongs to another one)
        shifted[:, :-1][documents[:, 1:] != documents[:, :-1]] = IGNORE_INDEX
    index = zigzag_index(length, cp_size, cp_rank).to(input_ids.device)
    keys = gathered_index(length, cp_size).to(input_ids.device)
    q = index[None, :, None]  # [1,2L,1]
    k = keys[None, None, :]  # [1,1,S]
    mask = (k <= q) & keep[:, keys][:, None, :] & (documents[:, index][:, :, None] == documents[:, keys][:, None, :])
    mask |= k == q  # every query sees itself: padding rows never become all -inf
    return SequenceShard(
        input_ids=_padded(input_ids, length, pad_id)[:, index],
        position_ids=positions[:, index],
        attention_mask=mask[:, None],
        padding_mask=~keep[:, index],
        shift_labels=shifted[:, index],
        index=index,
    )


def _document_ids(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B,S] document of each token: a new one wherever the position does not follow by exactly 1
    (padding is its own document, which the mask drops anyway)."""
    return (document_starts(positions) | ~keep).cumsum(-1)


class ContextParallelKernel:
    """An attention kernel that first all-gathers K and V [B,nKV,2L,hd] over the cp group.

    NOTE: one instance serves every layer. It turns the bool mask into sdpa's additive form once
    per forward, so all layers save the same [B,1,2L,S] tensor for backward instead of each
    converting (and saving) its own copy; it holds that tensor until the next forward's mask.
    """

    def __init__(self, kernel, group: dist.ProcessGroup):
        self.kernel = kernel
        self.group = group
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (bool mask, its additive form)

    def additive(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._mask is None or self._mask[0] is not mask or self._mask[1].dtype != dtype:
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._mask = (mask, bias)
        return self._mask[1]

    def __call__(self, q, k, v, mask, scale):
        if mask is None:
            raise ValueError(
                "context parallelism needs the 4-D attention_mask from ernie45.distributed.shard_sequence "
                "(which keys each local query may see); got none"
            )
        k = funcol.all_gather_single_autograd(k.contiguous(), gather_dim=2, group=self.group)
        v = funcol.all_gather_single_autograd(v.contiguous(), gather_dim=2, group=self.group)
        if mask.dtype == torch.bool and self.kernel is sdpa_attention:
            mask = self.additive(mask, q.dtype)
        return self.kernel(q, k, v, mask, scale)

    def __repr__(self) -> str:
        return f"ContextParallelKernel({getattr(self.kernel, '__name__', self.kernel)!r}, cp={self.group.size()})"


def context_parallel_refusal(rope_type: str) -> str | None:
    """Why context parallelism cannot run a model with this RoPE type (None: it can)."""
    if rope_type not in LENGTH_DEPENDENT_ROPE:
        return None
    return (
        f"rope_parameters.rope_type={rope_type!r} picks its frequencies from the longest position of each forward, "
        "and under context parallelism every rank sees other positions: use cp_size=1, or a RoPE scaling that "
        "does not depend on the length (linear, yarn, llama3)"
    )


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup) -> None:
    """Give every attention layer of ``model`` one kernel that gathers K/V over ``cp_group``."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and (why := context_parallel_refusal(module.rope_type)):
            raise LayoutError(why)
    layers = [m for m in model.modules() if isinstance(m, Ernie4_5Attention)]
    if not layers or isinstance(layers[0].kernel, ContextParallelKernel):
        return
    kernel = ContextParallelKernel(layers[0].kernel, cp_group)
    for module in layers:
        module.kernel = kernel


@contextlib.contextmanager
def local_attention(model: nn.Module) -> Iterator[None]:
    """Inside this block every rank attends over its own whole inputs (no K/V exchange): for
    evaluation code that does not split its sequences, such as HellaSwag scoring."""
    swapped = [m for m in model.modules() if isinstance(m, Ernie4_5Attention) and isinstance(m.kernel, ContextParallelKernel)]
    kernels = [m.kernel for m in swapped]
    for module, kernel in zip(swapped, kernels):
        module.kernel = kernel.kernel
    try:
        yield
    finally:
        for module, kernel in zip(swapped, kernels):
            module.kernel = kernel


def gather_sequence(local: torch.Tensor, shard: SequenceShard, cp_group: dist.ProcessGroup, seq_len: int) -> torch.Tensor:
    """The whole [B,S,...] tensor from every rank's [B,2L,...] share, in global order (no autograd)."""
    parts = funcol.all_gather_tensor(local.contiguous(), gather_dim=1, group=cp_group)
    order = gathered_index(parts.shape[1], cp_group.size()).to(local.device)
    whole = torch.empty_like(parts)
    whole[:, order] = parts
    return whole[:, :seq_len]
