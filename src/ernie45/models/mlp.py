"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` that keeps only its two inputs for backward.

    NOTE: plain autograd also keeps ``silu(gate)``, a third [tokens, intermediate] tensor per layer;
    recomputing it in backward is one cheap elementwise pass. Forward and gradients use the very
    kernels autograd would (``silu``, ``mul``, ``silu_backward``), so results are bitwise the same.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with lean activation memory (see ``_SwiGLU``)."""
    return _SwiGLU.apply(gate, up)


class Ernie4_5MLP(nn.Module):
    """Dense layers' feed-forward and the MoE layers' shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]; ``padding_mask`` is ignored (every position is computed)."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
