"""The causal-LM cross-entropy: position t predicts token t+1, labels of -100 are ignored, fp32 math.

One function for every user: the model's ``labels=`` / ``shift_labels=`` loss (mean, as
transformers) and the training recipe's ``MaskedCrossEntropy`` (sum, normalised later over the
global batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .decoder import out_of_range_id

IGNORE_INDEX = -100  # transformers' and PyTorch's "no label here"


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """logits [..., V] against already aligned targets [...] (-100 = none), in fp32."""
    _check_shape(targets, logits)
    flat = targets.reshape(-1)
    check_labels(flat, logits.shape[-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX, reduction=reduction)


def shifted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """logits [B,S,V], labels [B,S] -> CE of logits[:, :-1] against labels[:, 1:]."""
    _check_shape(labels, logits)
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], reduction)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None
) -> torch.Tensor | None:
    """transformers' causal-LM loss: mean CE; ``shift_labels`` [B,S'] (already aligned with the
    logits, as context-parallel training passes them) wins over shifting ``labels`` [B,S]."""
    if shift_labels is not None:
        return token_cross_entropy(logits, shift_labels)
    return shifted_cross_entropy(logits, labels) if labels is not None else None


def _check_shape(labels: torch.Tensor, logits: torch.Tensor) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of input_ids {list(logits.shape[:-1])} (and logits_to_keep=0), "
            f"got {list(labels.shape)}"
        )


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """A ValueError naming the bad label, instead of torch's IndexError inside cross_entropy."""
    bad = out_of_range_id(labels[labels != IGNORE_INDEX], vocab_size)
    if bad is not None:
        raise ValueError(
            f"label {bad} is out of range for vocab_size={vocab_size} "
            f"(valid: 0..{vocab_size - 1}, or {IGNORE_INDEX} to ignore)"
        )
