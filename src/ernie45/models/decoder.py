"""The decoder stack shared by the dense and MoE models: embedding, pre-norm blocks, final norm.

Architecture (ERNIE 4.5, checked against transformers in fp32):
  * token embedding [V,H], no scaling;
  * pre-norm blocks: ``h += o_proj(attn(norm1(h)))``, ``h += mlp(norm2(h))``;
  * RMSNorm normalised in fp32; GQA attention with interleaved RoPE (fp32 angles);
  * final RMSNorm, then the LM head (in causal_lm.py).
The MoE model only swaps the feed-forward of some blocks (ernie4_5_moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Ernie4_5Attention, build_attention_mask
from .backend import BackendConfig
from .mlp import Ernie4_5MLP
from .norms import build_rms_norm
from .rope import RotaryEmbedding, rope_theta


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming the bad id, instead of an index error deep inside embedding."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}; for one sequence use ids[None]"
        )
    bad = out_of_range_id(input_ids, vocab_size)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size} (valid ids: 0..{vocab_size - 1})")


def out_of_range_id(ids: torch.Tensor, vocab_size: int) -> int | None:
    """The lowest id if it is negative, else the highest if it is >= vocab_size, else None."""
    if ids.numel() == 0:
        return None
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        return low
    return high if high >= vocab_size else None


def key_padding(
    attention_mask: torch.Tensor | None, padding_mask: torch.Tensor | None, q_len: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key_keep [B,Sk] True = real token, or None; padding_mask [B,Sq] True = pad, or None)."""
    if attention_mask is not None:
        key_keep = attention_mask.bool()
        if padding_mask is None:
            padding_mask = ~key_keep[:, -q_len:]
    elif padding_mask is not None:
        key_keep = ~padding_mask.bool()
    else:
        return None, None
    if bool(key_keep.all()):
        return None, None
    return key_keep, padding_mask.bool()


class Ernie4_5Block(nn.Module):
    """One pre-norm transformer block with a dense SwiGLU MLP."""

    def __init__(self, config, backend: BackendConfig):
        super().__init__()
        self.input_layernorm = build_rms_norm(backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.self_attn = Ernie4_5Attention(config, backend)
        self.post_attention_layernorm = build_rms_norm(backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.mlp = self.build_mlp(config, backend)

    def build_mlp(self, config, backend: BackendConfig) -> nn.Module:
        return Ernie4_5MLP(config.hidden_size, config.intermediate_size, bool(config.use_bias))

    def feed_forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(h)

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """x [B,S,H]; attention_mask: prepared bool [B,1,Sq,Sk] or None (causal); padding_mask [B,S]."""
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, **attn_kwargs)
        return x + self.feed_forward(self.post_attention_layernorm(x), padding_mask)


class DecoderModel(nn.Module):
    """Embedding -> blocks -> final norm. Subclasses choose each layer's block in ``build_block``."""

    def __init__(self, config, backend: BackendConfig | None = None):
        super().__init__()
        self.config = config
        self.backend = backend or BackendConfig()
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        # NOTE: padding_idx matches HF: the pad row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(self.build_block(i) for i in range(config.num_hidden_layers))
        self.norm = build_rms_norm(self.backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), rope_theta(config))

    def build_block(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        kv_caches: list | None = None,
        **attn_kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """input_ids [B,S] -> (final hidden [B,S,H], all hidden states or None).

        attention_mask [B,Sk] is HF's (1 = keep; Sk = cached + new tokens when decoding);
        padding_mask [B,S] is its inverse for the new tokens (True = pad). Either may be given.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        past = kv_caches[0].length if kv_caches else 0
        # NOTE: an all-ones mask of the wrong length would otherwise pass silently (no padding -> no mask).
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, expected [batch, cached + new tokens] "
                f"= {[batch, past + seq]} with 1 = keep (HF convention)"
            )
        key_keep, padding_mask = key_padding(attention_mask, padding_mask, seq)
        mask = build_attention_mask(key_keep, seq)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None].expand(batch, -1)
        position_embeddings = self.rotary_emb(position_ids)

        h = self.embed_tokens(input_ids)  # [B,S,H]
        hidden_states = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if kv_caches is not None:
                attn_kwargs["kv_cache"] = kv_caches[i]
            h = layer(h, position_embeddings, mask, padding_mask, **attn_kwargs)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h  # as in transformers: the last entry is after the final norm
        return h, tuple(hidden_states) if hidden_states is not None else None
