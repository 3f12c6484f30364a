"""Grouped-query self-attention with interleaved RoPE and three kernels (BackendConfig.attn).

Masks arrive already built by the model (see ``build_attention_mask``): a bool tensor
[B,1,Sq,Sk] where True means "may attend", or None for plain causal attention over the
sequence. Building it once per forward (not per layer) keeps the hot path short.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import causal_attention as cpu_causal
from .dimensions import head_dim_of, kv_heads_of
from .kv_cache import KVCache
from .linear import Linear
from .rope import apply_rope


def _positions(q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [Sq,1], key positions [1,Sk]): query i sits at key position Sk - Sq + i,
    so the same masks serve a KV cache (Sq new tokens after Sk - Sq cached ones)."""
    return torch.arange(k_len - q_len, k_len, device=device)[:, None], torch.arange(k_len, device=device)[None, :]


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[Sq,Sk] bool, True = may attend."""
    q_pos, k_pos = _positions(q_len, k_len, device)
    return k_pos <= q_pos


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B,S] bool: True where a document starts, i.e. where the position does not follow the previous
    one by exactly 1 (transformers' padding-free rule; positions restarting at 0 split documents)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B,S] int: which document of a packed row each token belongs to, or None when no row is packed.

    Documents as ``document_starts`` finds them (``DataCollatorWithFlattening``'s layout).
    NOTE: one host sync, to keep the causal fast path for ordinary rows.
    """
    ids = document_starts(position_ids).cumsum(-1)
    return ids if bool((ids[:, -1] > 1).any()) else None


def packed_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens [D+1] int32, max_seqlen): the documents of all rows laid end to end, the THD form
    that varlen GPU kernels (flash-attention's ``*_varlen_func``, TE's THD) take."""
    begin = document_starts(position_ids).reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([begin, begin.new_tensor([position_ids.numel()])])
    return ends.to(torch.int32), int((ends[1:] - ends[:-1]).max())


class DocumentRuns(NamedTuple):
    """Packed rows regrouped as one padded batch of documents, so sdpa attends document by document
    in ONE causal call (no [S,S] block-diagonal mask, no compute across documents). D documents of
    real tokens, L = the longest; positions are flattened [B*S]. A row's tail padding is no document:
    it would set L (a short last row padded to the batch's length made every document as long as its
    padding: a 4.3 s packed HellaSwag step instead of 0.4 s); its positions get zeros (slot D*L)."""

    gather: torch.Tensor  # [D,L] flat position of each document's t-th token (past its end: its last token)
    scatter: torch.Tensor  # [B*S] flat slot (d*L + t) that holds each position's output; D*L: zeros


def document_runs(documents: torch.Tensor, key_keep: torch.Tensor | None) -> DocumentRuns | None:
    """The documents of packed rows whose padding (if any) is at the end of each row; None otherwise
    (e.g. left padding, or no real token), where the dense mask serves. NOTE: one host sync."""
    if key_keep is not None and (bool((key_keep[:, 1:] & ~key_keep[:, :-1]).any()) or not bool(key_keep.any())):
        return None  # a real token after padding, or none at all
    real = torch.ones_like(documents, dtype=torch.bool) if key_keep is None else key_keep
    starts = real.clone()
    starts[:, 1:] &= documents[:, 1:] != documents[:, :-1]  # padding starts no document
    starts, real = starts.reshape(-1), real.reshape(-1)
    begin = starts.nonzero().squeeze(1)  # [D] flat start of each document
    document = starts.cumsum(0) - 1  # [B*S] which document each real position is in
    length = torch.bincount(document[real], minlength=begin.numel())  # [D] real tokens only
    longest = int(length.max())
    offset = torch.arange(longest, device=begin.device)
    gather = begin[:, None] + torch.minimum(offset[None], length[:, None] - 1)  # [D,L]
    position = torch.arange(starts.numel(), device=begin.device) - begin[document]
    scatter = torch.where(real, document * longest + position, begin.numel() * longest)
    return DocumentRuns(gather, scatter)


def document_attention(q, k, v, runs: DocumentRuns, scale, gqa: bool):
    """q [B,nH,S,hd], k/v [B,nKV,S,hd] attended per document: regroup to [D,n,L,hd], one causal sdpa
    (a document's padding slots come after its tokens, so causality keeps them out), back to [B,nH,S,hd]
    (a row's tail padding: zeros)."""
    batch, _, seq, hd = q.shape

    docs, longest = runs.gather.shape

    def by_document(t: torch.Tensor) -> torch.Tensor:
        flat = t.transpose(1, 2).reshape(batch * seq, -1)  # [B*S,n*hd]
        # NOTE: index_select, whose backward is an index_add (indexing's would be a slow index_put)
        return flat.index_select(0, runs.gather.reshape(-1)).view(docs, longest, t.shape[1], hd).transpose(1, 2)

    q_docs, k_docs, v_docs = by_document(q), by_document(k), by_document(v)
    out = causal_sdpa(q_docs, k_docs, v_docs, scale, gqa)
    out = F.pad(out.transpose(1, 2).reshape(docs * longest, -1), (0, 0, 0, 1))  # [D*L+1,nH*hd], a zero row last
    out = out.index_select(0, runs.scatter)  # [B*S,nH*hd]
    return out.view(batch, seq, q.shape[1], hd).transpose(1, 2)


def build_attention_mask(
    key_keep: torch.Tensor | None, q_len: int, documents: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Causal mask [B,1,Sq,Sk] (True = attend) from a key padding mask [B,Sk] (True = real token)
    and, for packed rows, document ids [B,S] (a token attends only within its document).

    As transformers' mask: only the keys decide, so a query of leading padding sees no key at all
    (every kernel then gives it a zero output, as torch's sdpa does) and real tokens never see
    padding. Returns None when there is neither padding nor packing: kernels then use their causal
    fast path.
    """
    if key_keep is None and documents is None:
        return None
    reference = key_keep if key_keep is not None else documents
    batch, k_len = reference.shape
    q_pos, k_pos = _positions(q_len, k_len, reference.device)
    mask = (k_pos <= q_pos)[None].expand(batch, -1, -1)  # [B,Sq,Sk]
    if key_keep is not None:
        mask = mask & key_keep.bool()[:, None, :]
    if documents is not None:
        mask = mask & (documents[:, -q_len:, None] == documents[:, None, :])
    return mask[:, None]  # [B,1,Sq,Sk]


def causal_sdpa(q, k, v, scale, gqa):
    """sdpa's causal call, query i of Sq seeing keys <= Sk - Sq + i (Sq <= Sk): on CPUs with AVX512-BF16,
    in bf16, our kernel (``kernels/causal_attention.py``, 2.3-2.9x torch's forward there), else torch's."""
    if cpu_causal.usable(q, k, v):
        return cpu_causal.causal_attention(q, k, v, scale)
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_mask(q_len, k_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sdpa_attention(q, k, v, mask, scale):
    """q [B,nH,Sq,hd], k/v [B,nKV,Sk,hd] -> [B,nH,Sq,hd]; GQA handled natively by the kernel."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, DocumentRuns):
        return document_attention(q, k, v, mask, scale, gqa)
    if mask is None and q.shape[2] > 1:  # NOTE: one new token after a KV cache sees every key; no mask
        return causal_sdpa(q, k, v, scale, gqa)
    if q.shape[2] == 1:
        return one_query_attention(q, k, v, mask, scale, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def one_query_attention(q, k, v, mask, scale, gqa):
    """One new token per sequence over its KV cache (decoding): q [B,nH,1,hd].

    NOTE: on a CPU, torch's kernel takes one bf16/fp16 query row per head through its reduced-precision
    GEMMs, which is slow: 224 us vs 56 us at 96 keys, 3.5 vs 0.56 ms at 2,048, 14 vs 10 ms at 8,192
    (dense-0.3b's heads, batch 1, the casts included). The same kernel in fp32 is that much faster and
    no less accurate (its softmax and sums run in fp32 either way), so query and cache are cast up.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def eager_attention(q, k, v, mask, scale):
    """The textbook math (softmax in fp32), the reference the fast kernels are checked against."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    # NOTE: a query that sees no key (leading padding) gets a zero output, as sdpa gives it, and no NaN
    sees_a_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~sees_a_key, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).masked_fill(~sees_a_key, 0.0).to(q.dtype)
    return torch.matmul(probs, v)


def flex_block_mask(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device):
    """The BlockMask flex_attention takes, from a prepared mask [B,1,Sq,Sk] or None (causal).
    Built once per forward by the model (see ``prepare_mask``), not once per layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    if mask is None:
        offset = k_len - q_len

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return create_block_mask(causal, None, None, q_len, k_len, device=device)
    dense = mask[:, 0]

    def given(b, h, q_idx, kv_idx):
        return dense[b, q_idx, kv_idx]

    return create_block_mask(given, batch, None, q_len, k_len, device=device)


def flex_attention(q, k, v, mask, scale):
    """torch's flex_attention with a BlockMask (from ``flex_block_mask``); forward only on CPU."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "BackendConfig.attn='flex' has no backward pass on CPU in torch 2.13; "
            "use attn='sdpa' to train on CPU, or run flex under torch.no_grad()"
        )
    if not isinstance(mask, BlockMask):
        mask = flex_block_mask(mask, q.shape[0], q.shape[2], k.shape[2], q.device)
    return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def prepare_mask(kernel: str, mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device):
    """The mask in the form ``kernel`` takes: flex's BlockMask is built here, once for all layers."""
    return flex_block_mask(mask, batch, q_len, k_len, device) if kernel == "flex" else mask


ATTENTION_KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention, "flex": flex_attention}


class Ernie4_5Attention(nn.Module):
    """q/k/v/o projections (bias iff ``use_bias``), RoPE on q and k, scale ``head_dim**-0.5``."""

    def __init__(self, config, backend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, bool(config.use_bias)
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.kernel = ATTENTION_KERNELS[backend.attn]

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B,S,H] -> [B,S,H]. ``kv_cache.update(k, v)`` (if given) returns all keys/values so far."""
        batch, seq, _ = x.shape
        # NOTE: heads are read off the projection width, so tensor-parallel shards work unchanged.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,nH,S,hd]
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,nKV,S,hd]
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, rotation)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = self.kernel(q, k, v, attention_mask, self.scale)  # [B,nH,S,hd]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
