"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, autocast_cast_dtype, cast_linear, linear_backward, own_backward_applies


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, silu_gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad gate, grad up) of ``silu(gate) * up`` (``silu_gate``: ``silu(gate)`` if made already):
    the kernels autograd would call (``mul``, ``silu_backward``), so the bits are autograd's."""
    silu_gate = F.silu(gate) if silu_gate is None else silu_gate
    return torch.ops.aten.silu_backward(grad * up, gate), grad * silu_gate


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` that keeps only its two inputs for backward.

    NOTE: plain autograd also keeps ``silu(gate)``, a third [tokens, intermediate] tensor per layer;
    recomputing it in backward is one cheap elementwise pass.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return swiglu_backward(grad, *ctx.saved_tensors)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with lean activation memory (see ``_SwiGLU``)."""
    return _SwiGLU.apply(gate, up)


class _SwiGLUDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` keeping gate, up and the down weight for backward, not the
    [tokens, intermediate] SwiGLU output: backward makes it again from gate and up (one elementwise
    pass; 12 MiB a layer of an fp32 0.3B step at 1,024 tokens, 0.21 GiB in all).

    NOTE: the product is ``Linear``'s (``cast_linear``: under autocast the fp32 weight cast, and cast
    again in backward) and the gradients its and ``_SwiGLU``'s, so every bit is the unfused path's.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, dtype):  # gate, up [..., I], weight [H, I]
        out, _ = cast_linear(F.silu(gate) * up, weight, bias, dtype)
        ctx.save_for_backward(gate, up, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # grad [..., H]
        gate, up, weight = ctx.saved_tensors
        silu_gate = F.silu(gate)
        act = silu_gate * up  # [..., I], the forward's SwiGLU output again
        needs_grad = (ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                      ctx.has_bias and ctx.needs_input_grad[3])  # fmt: skip
        grad_act, grad_weight, grad_bias = linear_backward(grad, act, weight, ctx.dtype, act.dtype, needs_grad)
        del act
        grad_gate = grad_up = None
        if grad_act is not None:
            grad_gate, grad_up = swiglu_backward(grad_act, gate, up, silu_gate)
        return grad_gate, grad_up, grad_weight, grad_bias, None


def _runs_as_plain_linear(down: nn.Module, gate: torch.Tensor) -> bool:
    """``down`` is exactly our ``Linear``, called as it is (no hooks, no forward of its own, which
    tensor parallelism, LoRA and other wrappers add), in a product ``Linear``'s backward may take."""
    hooked = down._forward_hooks or down._forward_pre_hooks or "forward" in down.__dict__
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    return type(down) is Linear and not (hooked or global_hooks) and own_backward_applies(gate, down.weight, down.bias)


class Ernie4_5MLP(nn.Module):
    """Dense layers' feed-forward and the MoE layers' shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]; ``padding_mask`` is ignored (every position is computed)."""
        gate, up = self.gate_proj(x), self.up_proj(x)  # [..., I] each
        down = self.down_proj
        if _runs_as_plain_linear(down, gate):
            return _SwiGLUDown.apply(gate, up, down.weight, down.bias, autocast_cast_dtype(down.weight))
        return down(swiglu(gate, up))
