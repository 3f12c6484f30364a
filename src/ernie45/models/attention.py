"""Grouped-query self-attention with interleaved RoPE and three kernels (BackendConfig.attn).

Masks arrive already built by the model (see ``build_attention_mask``): a bool tensor
[B,1,Sq,Sk] where True means "may attend", or None for plain causal attention over the
sequence. Building it once per forward (not per layer) keeps the hot path short.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


def build_attention_mask(key_keep: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """Causal mask [B,1,Sq,Sk] (True = attend) from a key padding mask [B,Sk] (True = real token).

    Query i sits at key position Sk - Sq + i, so the same rule serves a KV cache. Every query may
    attend to itself, so rows of padding never become all -inf (no NaN), while real tokens never
    see padding. Returns None when there is no padding: kernels then use their causal fast path.
    """
    if key_keep is None:
        return None
    key_keep = key_keep.bool()
    batch, k_len = key_keep.shape
    q_pos = torch.arange(k_len - q_len, k_len, device=key_keep.device)[:, None]
    k_pos = torch.arange(k_len, device=key_keep.device)[None, :]
    causal = k_pos <= q_pos  # [Sq,Sk]
    mask = causal[None] & key_keep[:, None, :]
    mask |= k_pos == q_pos
    return mask[:, None]  # [B,1,Sq,Sk]


def _causal_bool(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def sdpa_attention(q, k, v, mask, scale):
    """q [B,nH,Sq,hd], k/v [B,nKV,Sk,hd] -> [B,nH,Sq,hd]; GQA handled natively by the kernel."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        q_len, k_len = q.shape[2], k.shape[2]
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if q_len == 1:  # NOTE: one new token after a KV cache sees every key; no mask to build
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        mask = _causal_bool(q_len, k_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def eager_attention(q, k, v, mask, scale):
    """The textbook math (softmax in fp32), the reference the fast kernels are checked against."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        mask = _causal_bool(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def flex_attention(q, k, v, mask, scale):
    """torch's flex_attention with a mask_mod over the prepared mask (forward only on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "BackendConfig.attn='flex' has no backward pass on CPU in torch 2.13; "
            "use attn='sdpa' to train on CPU, or run flex under torch.no_grad()"
        )
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    if mask is None:
        offset = k_len - q_len

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(mask_mod, None, None, q_len, k_len, device=q.device)
    else:
        dense = mask[:, 0]

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[b, q_idx, kv_idx]

        block_mask = create_block_mask(mask_mod, batch, None, q_len, k_len, device=q.device)
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


ATTENTION_KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention, "flex": flex_attention}


class Ernie4_5Attention(nn.Module):
    """q/k/v/o projections (bias iff ``use_bias``), RoPE on q and k, scale ``head_dim**-0.5``."""

    def __init__(self, config, backend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, bool(config.use_bias)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.kernel = ATTENTION_KERNELS[backend.attn]

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache=None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """x [B,S,H] -> [B,S,H]. ``kv_cache.update(k, v)`` (if given) returns all keys/values so far."""
        batch, seq, _ = x.shape
        # NOTE: heads are read off the projection width, so tensor-parallel shards work unchanged.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,nH,S,hd]
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,nKV,S,hd]
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, *position_embeddings)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = self.kernel(q, k, v, attention_mask, self.scale)  # [B,nH,S,hd]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
