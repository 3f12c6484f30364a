"""Interleaved ("rotate every two", GLM-style) rotary position embedding used by ERNIE 4.5.

Unlike Llama's half-split RoPE, ERNIE rotates adjacent pairs (x0, x1), (x2, x3), ... so HF
checkpoints are used as they are, with no q/k permutation. All angle math runs in fp32.

The released checkpoints use plain RoPE (``rope_type: default``). For context extension a config may
name any of transformers' scaled types (``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``,
...): their frequencies and attention factor come from transformers' own ``ROPE_INIT_FUNCTIONS``,
and the length-dependent ones (``dynamic``, ``longrope``) follow the longest position of each forward
as transformers does, so logits stay transformers'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Frequencies that depend on the longest position of the forward (transformers' dynamic_rope_update).
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_parameters(config: Any) -> dict:
    """``rope_parameters`` of an HF config or of a plain mapping such as a recipe's ``model.config``."""
    if isinstance(config, Mapping):  # NOTE: rope_scaling is transformers 4's name
        params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    else:
        params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, Mapping):
        example = {"rope_type": "default", "rope_theta": 500000.0}
        raise ValueError(f"rope_parameters={params!r} must be a mapping such as {example}")
    return dict(params)


def rope_type(config: Any) -> str:
    """``default`` or the scaled type a config names; unknown types and partial rotation are refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = _rope_parameters(config)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
        raise ValueError(f"rope_parameters.rope_type={kind!r} is not a RoPE type transformers knows; use one of {known}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']!r}: ERNIE 4.5 rotates every "
            "dimension of a head (transformers' ERNIE 4.5 too); remove it or set it to 1.0"
        )
    return kind


def rope_theta(config: Any) -> float:
    """The RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older files)."""
    return float(_rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 500000.0)))


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
    angle per rotated pair, computed once per forward for all layers.

    ``config`` (an HF config) is read only for a scaled ``rope_type``; without it the RoPE is plain.
    """

    def __init__(self, head_dim: int, theta: float, device: torch.device | None = None, config: Any = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.config = config
        self.rope_type = rope_type(config) if config is not None else "default"
        self.attention_scaling = 1.0  # cos and sin are multiplied by it (yarn, longrope)
        self.register_buffer("inv_freq", torch.empty(0, device=device), persistent=False)
        self.reset_inv_freq(device)

    def _frequencies(self, device: torch.device | None, seq_len: Any = None) -> torch.Tensor:
        """[hd/2] fp32 for the longest position ``seq_len`` (None: the config's), setting attention_scaling."""
        if self.rope_type == "default":
            return inverse_frequencies(self.head_dim, self.theta, device)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        try:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device, seq_len=seq_len)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"rope_parameters={self.config.rope_parameters} cannot give {self.rope_type!r} RoPE frequencies for "
                f"head_dim={self.head_dim}: {err}"
            ) from None
        return inv_freq.float()

    def reset_inv_freq(self, device: torch.device | None = None) -> None:
        """Compute the frequencies afresh in fp32 on ``device`` (default: the buffer's; used after building
        on the meta device, and after a dtype cast, which must not round them)."""
        if device is None and not self.inv_freq.is_meta:
            device = self.inv_freq.device
        self.inv_freq = self._frequencies(device)
        if self.rope_type == "dynamic":  # what a forward within the trained length goes back to
            self.register_buffer("original_inv_freq", self.inv_freq, persistent=False)
            self.cached_len = self.config.max_position_embeddings  # the longest position inv_freq is for
        elif self.rope_type == "longrope":  # inv_freq has the short factors, these the long ones
            long_inv_freq = self._frequencies(device, seq_len=self.original_len + 1)
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    @property
    def original_len(self) -> int:
        """The pre-training length beyond which longrope switches to its long factors."""
        return self.config.rope_parameters["original_max_position_embeddings"]

    def _apply(self, fn, recurse=True):
        # NOTE: .to(bfloat16) must not round the frequencies; they are cheap to recompute in fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_inv_freq()
        return self

    def _follow_length(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The frequencies for this forward's longest position (transformers' dynamic_rope_update)."""
        seq_len = position_ids.max() + 1
        if self.rope_type == "longrope":
            return torch.where(seq_len > self.original_len, self.long_inv_freq, self.inv_freq)
        original_len = self.config.max_position_embeddings
        if seq_len > self.cached_len:  # grown past what the frequencies are for: stretch them
            self.inv_freq = self._frequencies(self.inv_freq.device, seq_len=seq_len)
            self.cached_len = seq_len
        elif seq_len < original_len < self.cached_len:  # back within the trained length: plain again
            self.inv_freq = self.original_inv_freq
            self.cached_len = original_len
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        inv_freq = self._follow_length(position_ids) if self.rope_type in LENGTH_DEPENDENT_ROPE else self.inv_freq
        angles = position_ids[..., None].float() * inv_freq  # [B,S,hd/2]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return torch.complex(cos, sin)
