"""The causal-LM cross-entropy: position t predicts token t+1, labels of -100 are ignored, fp32 math.

One function for every user: the model's ``labels=`` / ``shift_labels=`` loss (mean, as
transformers) and the training recipe's ``MaskedCrossEntropy`` (sum, normalised later over the
global batch). Also the fp32 log-softmax in place that the fused loss and scoring share.
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
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor | None:
    """transformers' causal-LM loss: mean CE; ``shift_labels`` [B,S'] (already aligned with the
    logits, as context-parallel training passes them) wins over shifting ``labels`` [B,S].
    ``num_items_in_batch`` (transformers' Trainer passes the labelled tokens of all accumulated
    micro-batches): the summed CE divided by it instead of the mean."""
    if labels is None and shift_labels is None:
        return None
    reduction = "mean" if num_items_in_batch is None else "sum"
    if shift_labels is not None:
        loss = token_cross_entropy(logits, shift_labels, reduction)
    else:
        loss = shifted_cross_entropy(logits, labels, reduction)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


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


def log_softmax_(x: torch.Tensor) -> None:
    """x [c,V] -> log_softmax(x) over V, in place.

    NOTE: on CPU the kernel reads each row's element before writing it, so ``out=x`` is exact
    (checked against ``torch.log_softmax``, bitwise) and saves a fresh [c,V] fp32 tensor, whose
    page faults cost more than the softmax itself; elsewhere the caching allocator makes the
    temporary cheap and aliasing is not promised, so it is copied back.
    """
    if x.device.type == "cpu":
        torch._log_softmax(x, -1, False, out=x)
    else:
        x.copy_(torch.log_softmax(x, -1))


# Rows of fp32 log-softmax at once when scoring: [32, V] fp32 is 13 MB for ERNIE's V = 103k, which
# stays in cache (200 rows of V = 103k bf16 logits, 2 cores: 7.5 ms at 32 rows a block, 25 ms at
# 128, 69 ms for a whole fp32 copy and logsumexp).
SCORE_BLOCK_ROWS = 32


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] of each row: logits [N,V] (any float dtype), targets [N] -> fp32 [N].

    The fp32 log-softmax runs ``SCORE_BLOCK_ROWS`` rows at a time in one reused buffer: no fp32
    copy of all N rows is made.
    """
    out = logits.new_empty(targets.shape, dtype=torch.float32)
    buffer = logits.new_empty((min(SCORE_BLOCK_ROWS, len(targets)), logits.shape[-1]), dtype=torch.float32)
    for start in range(0, len(targets), SCORE_BLOCK_ROWS):
        rows = buffer[: len(targets[start : start + SCORE_BLOCK_ROWS])].copy_(logits[start : start + SCORE_BLOCK_ROWS])
        log_softmax_(rows)
        out[start : start + len(rows)] = rows.gather(-1, targets[start : start + len(rows), None]).squeeze(-1)
    return out
