"""The decoder stack shared by the dense and MoE models: embedding, pre-norm blocks, final norm.

Architecture (ERNIE 4.5, checked against transformers in fp32):
  * token embedding [V,H], no scaling;
  * pre-norm blocks: ``h += o_proj(attn(norm1(h)))``, ``h += mlp(norm2(h))``;
  * RMSNorm normalised in fp32; GQA attention with interleaved RoPE (fp32 angles);
  * final RMSNorm, then the LM head (in causal_lm.py).
The MoE model only swaps the feed-forward of some blocks (ernie4_5_moe.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from .attention import Ernie4_5Attention, build_attention_mask, document_ids, document_runs, prepare_mask
from .backend import BackendConfig
from .dimensions import head_dim_of
from .embedding import HeadGradient, embed_tokens
from .kv_cache import KVCache, make_kv_caches
from .mlp import Ernie4_5MLP
from .norms import build_rms_norm
from .rope import RotaryEmbedding, rope_theta


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
    """One pre-norm transformer block: attention, then a feed-forward (dense SwiGLU unless given).

    NOTE: composition, as torchtitan's DeepSeek-V3 block: the MoE model passes its MoE layer as
    ``mlp``. Every feed-forward takes ``forward(x, padding_mask=None)``.
    """

    def __init__(self, config, backend: BackendConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = build_rms_norm(backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.self_attn = Ernie4_5Attention(config, backend)
        self.post_attention_layernorm = build_rms_norm(backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else Ernie4_5MLP(config.hidden_size, config.intermediate_size, bool(config.use_bias))

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B,S,H]; attention_mask: prepared bool [B,1,Sq,Sk] or None (causal); padding_mask [B,S]."""
        x = x + self.self_attn(self.input_layernorm(x), rotation, attention_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x), padding_mask)


def prepared_mask(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """A caller's 4-D mask [B,1,S,Sk] (bool, or 0/1 integers; True = may attend), checked."""
    if mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[2] != seq:
        raise ValueError(f"a 4-D attention_mask must be [batch, 1, seq, keys] = [{batch}, 1, {seq}, keys], got {list(mask.shape)}")
    if mask.is_floating_point():
        raise ValueError("a 4-D attention_mask must be bool or 0/1 integers (True = may attend), not an additive float mask")
    return mask.bool()


def tuple_when_asked(forward: Callable) -> Callable:
    """transformers' ``return_dict=False``: the output as a tuple of its set fields, for any forward."""

    @functools.wraps(forward)
    def wrapper(self, *args, return_dict: bool | None = None, **kwargs):
        out = forward(self, *args, **kwargs)
        return out if return_dict is not False else out.to_tuple()

    return wrapper


def resolve_caches(
    cache: list[KVCache] | None, past_key_values: list[KVCache] | None, use_cache: bool | None, num_layers: int
) -> list[KVCache] | None:
    """The per-layer KV caches to write into: those given (``cache``, or transformers' older name
    ``past_key_values``), new growable ones for ``use_cache=True``, or None."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV caches as cache (or its older name past_key_values), not both")
    cache = cache if cache is not None else past_key_values
    if cache is None:
        return make_kv_caches(num_layers) if use_cache else None
    if not (isinstance(cache, (list, tuple)) and len(cache) == num_layers and all(isinstance(c, KVCache) for c in cache)):
        raise TypeError(
            f"cache must be the list of {num_layers} ernie45 KVCache objects that a previous call returned "
            "(output.cache) or ernie45.models.kv_cache.make_kv_caches made; "
            f"got {type(cache).__name__} (transformers Cache objects are not supported)"
        )
    return list(cache)


def resolve_positions(
    position_ids: torch.Tensor | None, cache_position: torch.Tensor | None, batch: int, seq: int, past: int, device
) -> torch.Tensor:
    """Position ids [B,S]: as given ([S] is one row for every sequence), else ``cache_position``, else
    past .. past + S - 1 (after ``past`` cached tokens)."""
    if position_ids is None:
        position_ids = cache_position if cache_position is not None else torch.arange(past, past + seq, device=device)
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids has shape {list(position_ids.shape)}; expected [batch, seq] = {[batch, seq]} "
            f"(or [seq], the same positions for every row)"
        )
    return position_ids.expand(batch, -1)


class DecoderLayers(nn.ModuleDict):
    """The decoder blocks keyed by their layer index: "0", "1", ... (checkpoint names ``model.layers.{i}``).

    Read both as transformers' ``ModuleList`` (``layers[0]``, ``layers[-1]``, slices, ``len``;
    iterating yields the blocks in order) and as NeMo AutoModel's ``ModuleDict`` (``layers["0"]``,
    ``.items()``). A pipeline stage keeps a subset under the same keys.
    """

    def __init__(self, blocks: dict[int, nn.Module] | list[nn.Module]):
        pairs = blocks.items() if isinstance(blocks, dict) else enumerate(blocks)
        super().__init__({str(i): block for i, block in pairs})

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index: int | str | slice) -> nn.Module:
        if isinstance(index, slice):
            return nn.ModuleList(list(self.values())[index])
        if isinstance(index, int) and index < 0:
            return list(self.values())[index]
        if isinstance(index, int) and str(index) not in self._modules:
            raise IndexError(f"no decoder layer {index} here: this model holds layers {list(self.keys())}")
        return super().__getitem__(str(index))

    def __setitem__(self, index: int | str, block: nn.Module) -> None:
        super().__setitem__(str(index), block)


class DecoderModel(nn.Module):
    """Embedding -> the given blocks -> final norm (dense and MoE models differ only in their blocks)."""

    def __init__(self, config, backend: BackendConfig, blocks: list[nn.Module]):
        super().__init__()
        self.config = config
        self.backend = backend
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        # NOTE: padding_idx matches HF: the pad row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = DecoderLayers(blocks)
        self.norm = build_rms_norm(backend.rms_norm, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), rope_theta(config), config=config)
        # The last forward's tied-head meeting point (see models/embedding.py); None without one.
        self.head_gradient: HeadGradient | None = None

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B,S,H] from token ids (checked against the vocabulary) or from embeddings given as they are."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [batch, seq] and inputs_embeds [batch, seq, hidden]")
        self.head_gradient = None
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be [batch, seq, hidden_size={self.config.hidden_size}], "
                    f"got {list(inputs_embeds.shape)}"
                )
            return inputs_embeds
        check_token_ids(input_ids, self.config.vocab_size)
        h, self.head_gradient = embed_tokens(self.embed_tokens, input_ids)
        return h

    def mask_for(
        self,
        attention_mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
        positions: torch.Tensor,
        past: int,
        may_be_packed: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(attention mask [B,1,S,Sk] or None for plain causal, padding_mask [B,S] or None) from HF's
        2-D mask or our padding mask, and the document ids of packed rows."""
        batch, seq = positions.shape
        # NOTE: an all-ones mask of the wrong length would otherwise pass silently (no padding -> no mask).
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, expected [batch, cached + new tokens] "
                f"= {[batch, past + seq]} with 1 = keep (HF convention), or a prepared [batch, 1, seq, keys] mask"
            )
        key_keep, padding_mask = key_padding(attention_mask, padding_mask, seq)
        # NOTE: packed rows (positions restarting per document) are only looked for in given position
        # ids without a cache, as transformers does; otherwise positions are known to be plain.
        documents = document_ids(positions) if may_be_packed else None
        if documents is not None and self.backend.attn == "sdpa":
            runs = document_runs(documents, key_keep)
            if runs is not None:
                return runs, padding_mask
        return build_attention_mask(key_keep, seq, documents), padding_mask

    def layer_inputs(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(RoPE rotation [B,S,hd/2] complex64, prepared attention mask, padding_mask [B,S]): what every
        block takes besides the hidden states h [B,S,H]. Built once per forward; a pipeline stage, which runs only some
        of the blocks, builds them from the same arguments."""
        batch, seq = h.shape[:2]
        past = caches[0].length if caches else 0
        positions = resolve_positions(position_ids, cache_position, batch, seq, past, h.device)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = prepared_mask(attention_mask, batch, seq)  # the caller's own mask, e.g. context parallel
            padding_mask = padding_mask.bool() if padding_mask is not None else None
        else:
            may_be_packed = caches is None and position_ids is not None
            mask, padding_mask = self.mask_for(attention_mask, padding_mask, positions, past, may_be_packed)
        keys = mask.shape[-1] if isinstance(mask, torch.Tensor) else past + seq
        mask = prepare_mask(self.backend.attn, mask, batch, seq, keys, h.device)
        return self.rotary_emb(positions), mask, padding_mask

    @tuple_when_asked
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        cache: list[KVCache] | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast:
        """input_ids [B,S] (or inputs_embeds [B,S,H]) -> ``last_hidden_state`` [B,S,H] after the final norm.

        attention_mask [B,Sk] is HF's (1 = keep; Sk = cached + new tokens when decoding);
        padding_mask [B,S] is its inverse for the new tokens (True = pad). Either may be given.
        A 4-D attention_mask [B,1,S,Sk] (bool or 0/1, True = may attend) is used as it is, with
        ``padding_mask`` (if any) marking the padding among the new tokens.
        Packed rows (transformers' padding-free form): ``position_ids`` that restart at 0 for each
        document; every token then attends only within its own document.
        ``cache`` (transformers' older name: ``past_key_values``): the KV caches of earlier calls
        (``use_cache=True`` starts new ones); they are returned in the output's ``cache``.
        ``return_dict=False`` gives transformers' tuple instead (``tuple_when_asked``).
        """
        h = self.embed(input_ids, inputs_embeds)  # [B,S,H]
        caches = resolve_caches(cache, past_key_values, use_cache, len(self.layers))
        rotation, mask, padding_mask = self.layer_inputs(
            h, position_ids, attention_mask, padding_mask, caches, cache_position
        )
        if output_hidden_states is None:  # as transformers: the config's setting
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        hidden_states = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            h = layer(h, rotation, mask, padding_mask, caches[i] if caches is not None else None)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h  # as in transformers: the last entry is after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            cache=caches,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )
