"""Aux-loss-free load balancing: the correction-bias update, and the expert loads it reads.

DeepSeek-V3 style, ERNIE's ``e_score_correction_bias``: after an optimizer step,
``bias += u * sign(mean(load) - load)`` per layer, where load is the number of tokens routed to
each expert (``MoERecord.tokens_per_expert``, summed over micro-batches and all-reduced over
data-parallel ranks by the caller). Overloaded experts become less likely to be selected; the
weights still come from the unbiased softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .layer import moe_layers


def collect_tokens_per_expert(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: [E] int64 tokens per expert of the last forward}, for metrics and balancing."""
    return {
        idx: layer.last_record.tokens_per_expert
        for idx, layer in moe_layers(model).items()
        if layer.last_record is not None
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
