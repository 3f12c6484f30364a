"""Load balancing: the Switch-style auxiliary loss and the aux-loss-free correction-bias update.

Aux loss (transformers' ``load_balancing_loss_func``, padding excluded): over all MoE layers,
with the *unbiased* top-K of the router softmax p,

    f_e = (# choices of expert e) / rows,  P_e = sum(p[:, e]) / rows,  loss = E * sum_e f_e * P_e

where counts, probability sums and rows are summed over layers before dividing (as HF does). The
model returns it unweighted as ``output.aux_loss``; training adds ``aux_loss_coeff * aux_loss``.

Aux-loss-free balancing (DeepSeek-V3 style, ERNIE's ``e_score_correction_bias``): after an
optimizer step, ``bias += u * sign(mean(load) - load)`` per layer, where load is the number of
tokens routed to each expert (``layer.last_tokens_per_expert``, summed over micro-batches and
all-reduced over data-parallel ranks by the caller). Overloaded experts become less likely to be
selected; the weights still come from the unbiased softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn


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


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: MoE layer} of a model (any wrapper around it)."""
    from .layer import MoELayer

    return {m.layer_idx: m for m in model.modules() if isinstance(m, MoELayer)}


def collect_tokens_per_expert(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: [E] int64 tokens per expert of the last forward}, for metrics and balancing."""
    return {
        idx: layer.last_tokens_per_expert
        for idx, layer in moe_layers(model).items()
        if layer.last_tokens_per_expert is not None
    }


@torch.no_grad()
def update_correction_bias(
    model: nn.Module,
    tokens_per_expert_by_layer: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor,
    rate: float | None = None,
) -> None:
    """``bias += rate * sign(mean(load) - load)`` for every MoE layer given.

    tokens_per_expert_by_layer: {layer index: [E] counts}, or a sequence / [L_moe, E] tensor in
    MoE-layer order (already reduced over data-parallel ranks). rate: u; None uses each layer's
    ``MoEConfig.gate_bias_update_factor``; 0 does nothing.
    """
    layers = moe_layers(model)
    if isinstance(tokens_per_expert_by_layer, Mapping):
        loads = dict(tokens_per_expert_by_layer)
    else:
        loads = dict(zip(sorted(layers), list(tokens_per_expert_by_layer), strict=True))
    for idx, load in loads.items():
        if idx not in layers:
            raise ValueError(f"layer {idx} is not an MoE layer; MoE layers are {sorted(layers)}")
        layer = layers[idx]
        u = layer.moe_config.gate_bias_update_factor if rate is None else rate
        if u == 0:
            continue
        bias = layer.moe_statics.e_score_correction_bias  # [1,E] fp32
        load = load.to(device=bias.device, dtype=torch.float32).reshape(1, -1)
        if load.shape != bias.shape:
            raise ValueError(f"layer {idx}: load has {load.shape[-1]} experts, the bias {bias.shape[-1]}")
        bias.add_(u * torch.sign(load.mean() - load))
