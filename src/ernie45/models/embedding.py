"""The token-embedding lookup, whose backward can complete a tied LM head's weight gradient.

With tied embeddings the LM head and the embedding share one [V,H] weight, and autograd gives it
two [V,H] gradients that it then adds: the head's (dense) and the embedding's (a zero-filled [V,H]
with the looked-up rows added). On CPU that zero-fill of ~100M fresh floats is ~10% of a MoE
training step, and it comes at the end of backward, when every other gradient exists too. A loss
that computes the head's weight gradient itself (``training.loss.FusedLinearCrossEntropy``) can
instead leave it in the forward's ``HeadGradient``, and this lookup's backward adds its rows into
that tensor: one [V,H] gradient, no fill, no extra pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadGradient:
    """One forward's meeting point: a fused loss may claim it (once, for this very weight), leave
    its head gradient in ``grad``, and the embedding's backward then adds its rows to that."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.claimed = False
        self.grad: torch.Tensor | None = None

    def claim(self, weight: torch.Tensor) -> bool:
        """True (once) if ``weight`` is the embedding's own weight: the head is tied to it."""
        if self.claimed or weight is not self.weight:
            return False
        self.claimed = True
        return True


class _Embedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose weight gradient starts from the claimed head
    gradient (else from zeros); the padding row gets no gradient, as in ``nn.Embedding``."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, head_gradient):
        ctx.save_for_backward(ids)
        ctx.head_gradient, ctx.padding_idx, ctx.weight_like = head_gradient, padding_idx, (weight.shape, weight.dtype)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):  # grad [..., H]
        (ids,) = ctx.saved_tensors
        head, ctx.head_gradient = ctx.head_gradient, None
        shape, dtype = ctx.weight_like
        total = head.grad if head.grad is not None else grad.new_zeros(shape, dtype=dtype)
        head.grad = None
        flat_ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((flat_ids == ctx.padding_idx)[:, None], 0)
        return None, total.index_add_(0, flat_ids, rows.to(dtype)), None, None


def embed_tokens(embedding: nn.Embedding, ids: torch.Tensor) -> tuple[torch.Tensor, HeadGradient | None]:
    """(embeddings [..., H], the forward's HeadGradient or None where a head cannot share it: no
    weight gradient, a distributed (DTensor) or otherwise special weight, non-default options)."""
    weight = embedding.weight
    plain_weight = type(weight.data) is torch.Tensor and torch.is_grad_enabled() and weight.requires_grad
    default_lookup = type(embedding).forward is nn.Embedding.forward and embedding.max_norm is None
    if not (plain_weight and default_lookup) or embedding.sparse or embedding.scale_grad_by_freq:
        return embedding(ids), None
    head_gradient = HeadGradient(weight)
    return _Embedding.apply(ids, weight, embedding.padding_idx, head_gradient), head_gradient
