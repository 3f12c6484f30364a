"""Interleaved ("rotate every two", GLM-style) rotary position embedding used by ERNIE 4.5.

Unlike Llama's half-split RoPE, ERNIE rotates adjacent pairs (x0, x1), (x2, x3), ... so HF
checkpoints are used as they are, with no q/k permutation. All angle math runs in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_theta(config) -> float:
    """The RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older files)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported; ERNIE 4.5 uses 'default' RoPE")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 500000.0)))


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[head_dim/2] fp32: 1 / theta^(2i/head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B,nH,S,hd] and k [B,nKV,S,hd] by ``rotation`` = cos + i*sin [B,S,hd/2] (complex64).

    NOTE: each adjacent pair (x0, x1) is the complex number x0 + i*x1, rotated by one complex product
    in fp32: the same products and sums as transformers' ``x*cos + rotate(x)*sin`` (forward bitwise
    equal), in one pass instead of eight, and backward is one conjugate product in fp32
    (transformers sums the two paths' gradients in the input dtype).
    """
    rotation = rotation.unsqueeze(1)  # [B,1,S,hd/2]
    return _rotate_pairs(q, rotation), _rotate_pairs(k, rotation)


def _rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B,n,S,hd/2] complex64
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the rotation cos + i*sin [B,S,hd/2] (complex64, fp32 angles), one
    angle per rotated pair, computed once per forward for all layers."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, device), persistent=False)

    def reset_inv_freq(self) -> None:
        """Recompute on the buffer's device (used after building on the meta device)."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = inverse_frequencies(self.head_dim, self.theta, device)

    def _apply(self, fn, recurse=True):
        # NOTE: .to(bfloat16) must not round the frequencies; they are cheap to recompute in fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inverse_frequencies(self.head_dim, self.theta, self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq  # [B,S,hd/2]
        return torch.complex(angles.cos(), angles.sin())
