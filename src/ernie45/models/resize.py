"""Growing or shrinking the vocabulary (transformers' ``resize_token_embeddings``), e.g. after adding
chat or special tokens to a tokenizer.

Rows that exist in both sizes are kept; rows cut off are dropped; added rows are drawn, as
transformers draws them: with ``mean_resizing`` from a normal distribution with the old rows'
mean and 1e-9 times their covariance (so the new tokens barely change what the model predicts),
else from N(0, initializer_range). A head bias gets its old mean (spread 1e-9 times its std), or
zeros. Unlike transformers, the embedding keeps its padding row (no gradient) when it still exists.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.multivariate_normal import MultivariateNormal

MEAN_RESIZING_SCALE = 1e-9  # transformers' epsilon: the added rows' covariance relative to the old rows'


def padded_size(new_num_tokens: int | None, current: int, pad_to_multiple_of: int | None) -> int:
    """The new vocabulary size: ``new_num_tokens`` (default: unchanged) rounded up to a multiple."""
    size = current if new_num_tokens is None else new_num_tokens
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"new_num_tokens={new_num_tokens!r} must be a positive integer (the tokenizer's len())")
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} must be a positive integer")
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    return size


@torch.no_grad()
def added_rows(old: torch.Tensor, count: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """``count`` new rows [count,H] for the matrix ``old`` [V,H], in its dtype (drawn in fp32)."""
    if not mean_resizing:
        return torch.empty(count, old.shape[1], device=old.device).normal_(0.0, std).to(old.dtype)
    rows = old.float()
    mean = rows.mean(0)
    centred = rows - mean
    covariance = MEAN_RESIZING_SCALE * (centred.T @ centred) / rows.shape[0]
    if not bool(constraints.positive_definite.check(covariance).all()):
        return mean.expand(count, -1).to(old.dtype)  # NOTE: fewer rows than dimensions: no distribution
    return MultivariateNormal(mean, covariance_matrix=covariance).sample((count,)).to(old.dtype)


@torch.no_grad()
def added_bias(old: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` new entries for the head bias ``old`` [V]: its mean, spread 1e-9 times its std."""
    values = old.float()
    return torch.empty(count, device=old.device).normal_(float(values.mean()), float(values.std()) * 1e-9).to(old.dtype)


@torch.no_grad()
def resized_matrix(old: torch.Tensor, size: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """``old`` [V,H] with ``size`` rows: the first min(V, size) kept, the rest added."""
    kept = old[:size]
    if size <= old.shape[0]:
        return kept.clone()
    return torch.cat([kept, added_rows(old, size - old.shape[0], mean_resizing, std)])


def resized_embedding(old: nn.Embedding, size: int, mean_resizing: bool, std: float) -> nn.Embedding:
    """A new embedding of ``size`` rows (same dtype, device, padding row when it still exists)."""
    padding_idx = old.padding_idx if old.padding_idx is not None and old.padding_idx < size else None
    new = nn.Embedding(size, old.embedding_dim, padding_idx=padding_idx, device="meta")
    new.weight = nn.Parameter(resized_matrix(old.weight, size, mean_resizing, std), old.weight.requires_grad)
    return new


def resized_head(
    old: nn.Linear, size: int, mean_resizing: bool, std: float, tied: nn.Parameter | None = None
) -> nn.Linear:
    """A new LM head (the same class) with ``size`` output rows and, when it has one, bias entries;
    ``tied``: the (resized) embedding weight it shares, used instead of resizing its own."""
    new = type(old)(old.in_features, size, bias=old.bias is not None, device="meta")
    if hasattr(old, "prepack"):  # NOTE: ernie45's Linear: keep its prepacked-inference setting
        new.prepack = old.prepack
    new.weight = tied if tied is not None else nn.Parameter(resized_matrix(old.weight, size, mean_resizing, std), old.weight.requires_grad)
    if old.bias is not None:
        bias = old.bias[:size].clone()
        count = size - old.bias.shape[0]
        if count > 0:
            extra = added_bias(old.bias, count) if mean_resizing else old.bias.new_zeros(count)
            bias = torch.cat([bias, extra])
        new.bias = nn.Parameter(bias, old.bias.requires_grad)
    return new
