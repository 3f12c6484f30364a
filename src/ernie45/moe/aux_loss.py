"""Routing statistics and the Switch-style auxiliary load-balancing loss (pure tensor functions).

Aux loss (transformers' ``load_balancing_loss_func``, padding excluded): over all MoE layers,
with the *unbiased* top-K of the router softmax p,

    f_e = (# choices of expert e) / rows,  P_e = sum(p[:, e]) / rows,  loss = E * sum_e f_e * P_e

where counts, probability sums and rows are summed over layers before dividing (as HF does). The
model returns it unweighted as ``output.aux_loss``; training adds ``aux_loss_coeff * aux_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class AuxStats(NamedTuple):
    counts: torch.Tensor  # [E] fp32, unbiased top-K choices per expert (no grad)
    prob_sum: torch.Tensor  # [E] fp32, sum of router probabilities (with grad)
    rows: torch.Tensor  # [] fp32, tokens counted


def tokens_per_expert(topk_idx: torch.Tensor, keep: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (non-padding) tokens chose each expert. No host sync."""
    with torch.no_grad():
        expert = topk_idx.reshape(-1)
        ones = torch.ones_like(expert)
        if keep is not None:
            ones = keep.reshape(-1, 1).expand_as(topk_idx).reshape(-1).to(expert.dtype)
        return torch.zeros(num_experts, dtype=torch.int64, device=expert.device).scatter_add_(0, expert, ones)


def aux_loss_stats(probs: torch.Tensor, top_k: int, keep: torch.Tensor | None) -> AuxStats:
    """One layer's contribution, from its router probabilities [T,E] fp32."""
    num_experts = probs.shape[-1]
    with torch.no_grad():
        unbiased = torch.topk(probs, top_k, dim=-1).indices
        mask = torch.ones(probs.shape[0], device=probs.device) if keep is None else keep.reshape(-1).float()
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, unbiased.reshape(-1), mask.repeat_interleave(top_k)
        )
    return AuxStats(counts, (probs * mask[:, None]).sum(0), mask.sum())


def load_balancing_loss(stats: Sequence[AuxStats], num_experts: int) -> torch.Tensor:
    """transformers' aux loss from per-layer stats (summed over layers, then normalised)."""
    counts = torch.stack([s.counts for s in stats]).sum(0)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)
    rows = torch.stack([s.rows for s in stats]).sum().clamp(min=1.0)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
