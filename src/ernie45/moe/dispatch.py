"""Token dispatch: group each token's K expert choices by expert, and scatter results back.

Shapes: T tokens, H hidden, K experts per token, E experts in the layer, E_local experts held by
this rank's ``experts`` module (E without expert parallelism), N rows sent to the local experts.

The contract (``layer.dispatcher`` is swappable, so expert parallelism plugs in from outside
without touching model code)::

    x_sorted, tokens_per_local_expert, state = dispatcher.dispatch(x, topk_idx, topk_weight, keep)
        x            [T,H]   the layer's input tokens (activation dtype)
        topk_idx     [T,K]   int64 expert of each choice, in [0, E)
        topk_weight  [T,K]   routing weight of each choice (activation dtype)
        keep         [T]     bool, False = padding (never sent to any expert), or None (all kept)
        x_sorted     [N,H]   rows for the local experts, grouped by local expert in order 0..E_local-1
        tokens_per_local_expert [E_local] int64, sums to N (0 is fine: empty experts)
        state        opaque; whatever ``combine`` needs
    y_sorted = layer.experts(x_sorted, tokens_per_local_expert)        [N,H]
    out = dispatcher.combine(y_sorted, state)                          [T,H]
        out[t] = sum_k topk_weight[t,k] * expert_{topk_idx[t,k]}(x[t]); padding rows are 0.

Both calls are autograd-transparent (gradients flow to x, topk_weight and the experts). Tokens are
never dropped. ``LocalDispatcher`` is the single-device version; an all-to-all version replaces it
under expert parallelism (the weights may stay local in ``state``, applied in ``combine``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LocalState(NamedTuple):
    token_idx: torch.Tensor  # [N] source token of each sorted row
    weight: torch.Tensor  # [N] routing weight of each sorted row
    num_tokens: int  # T


class _WeightedScatterSum(torch.autograd.Function):
    """``zeros[T,H].index_add(0, token_idx, y * weight[:, None])``, keeping for backward only what
    the gradients read: ``y``, ``weight`` and ``token_idx``.

    NOTE: autograd would also keep the weighted product, because ``index_add``'s backward formula
    names its source (for the source's shape only): one more [N,H] tensor per MoE layer, e.g.
    24 MiB per layer of an fp32 mini-MoE step at 1,024 tokens (K=6). The gradients are autograd's
    own calls (``index_select``, ``mul``, a sum over H), so the bits are the same.
    """

    @staticmethod
    def forward(ctx, y, weight, token_idx, num_tokens):  # y [N,H], weight [N], token_idx [N]
        ctx.save_for_backward(y, weight, token_idx)
        weighted = y * weight[:, None].to(y.dtype)
        return y.new_zeros(num_tokens, y.shape[-1]).index_add_(0, token_idx, weighted)

    @staticmethod
    def backward(ctx, grad):  # grad [T,H]
        y, weight, token_idx = ctx.saved_tensors
        grad_rows = grad.index_select(0, token_idx)  # [N,H]
        grad_y = grad_rows * weight[:, None].to(y.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_rows * y).sum(-1).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_weight, None, None


def weighted_scatter_sum(
    y: torch.Tensor, weight: torch.Tensor, token_idx: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """out [T,H]: ``out[token_idx[n]] += weight[n] * y[n]`` for every row n of y [N,H] (see
    ``_WeightedScatterSum``)."""
    return _WeightedScatterSum.apply(y, weight, token_idx, num_tokens)


class LocalDispatcher:
    """All experts live here: sort the (token, choice) pairs by expert, no communication."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, LocalState]:
        num_tokens, top_k = topk_idx.shape
        expert = topk_idx.reshape(-1)  # [T*K], token-major
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
        weight = topk_weight.reshape(-1)
        if keep is not None:
            # NOTE: one host sync for N; padding never reaches an expert (no wasted FLOPs, no stats).
            rows = keep.reshape(-1).repeat_interleave(top_k).nonzero().squeeze(1)
            expert, token, weight = expert[rows], token[rows], weight[rows]
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))
        order = torch.argsort(expert, stable=True)
        token_idx = token[order]
        return x[token_idx], counts, LocalState(token_idx, weight[order], num_tokens)

    def combine(self, y_sorted: torch.Tensor, state: LocalState) -> torch.Tensor:
        return weighted_scatter_sum(y_sorted, state.weight, state.token_idx, state.num_tokens)

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"
