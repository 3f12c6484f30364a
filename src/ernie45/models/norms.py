"""RMSNorm in the two flavours BackendConfig.rms_norm selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFP32(torch.autograd.Function):
    """The HF-exact math of ``RMSNorm(fp32=True)``, keeping only x and the [..., 1] inverse RMS.

    NOTE: plain autograd keeps the fp32 input and the normalised tensor, two [tokens, hidden]
    tensors per norm (37 norms in the 0.3B model); backward recomputes the normalised one from
    x and rstd in one pass. Forward is the same sequence of kernels, so outputs are bitwise equal.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            grad_weight = (grad * normed).to(weight.dtype).sum(dim=tuple(range(grad.dim() - 1)))
        # d/dx of x * rstd(x), rstd = (mean(x^2) + eps)^-1/2:  g * rstd - x * rstd^3 * mean(g * x)
        grad_normed = (grad * weight).to(x.dtype).float()
        grad_x = grad_normed * rstd - x32 * (rstd.pow(3) * (grad_normed * x32).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """``y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``.

    ``fp32=True`` ("torch_fp32") is the exact HF math: normalise in fp32, cast to the input dtype,
    then scale. ``fp32=False`` ("torch") uses the fused ``F.rms_norm`` kernel in the input dtype.
    """

    def __init__(self, hidden_size: int, eps: float, fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32:
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        return _RMSNormFP32.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, fp32={self.fp32}"


def build_rms_norm(kind: str, hidden_size: int, eps: float) -> RMSNorm:
    return RMSNorm(hidden_size, eps, fp32=(kind == "torch_fp32"))
