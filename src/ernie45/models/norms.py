"""RMSNorm in the two flavours BackendConfig.rms_norm selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, fp32={self.fp32}"


def build_rms_norm(kind: str, hidden_size: int, eps: float) -> RMSNorm:
    return RMSNorm(hidden_size, eps, fp32=(kind == "torch_fp32"))
