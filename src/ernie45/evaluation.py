"""HellaSwag accuracy by log-likelihood, as lm-evaluation-harness defines it.

Each example is a context and four endings. The model scores ending e by the sum of the log-probs
of its tokens given the context (the continuation is " " + ending). ``acc`` picks the ending with
the highest sum; ``acc_norm`` divides each sum by the ending's length in characters first (without
the joining space), which removes the bias towards short endings. Tokenization follows lm-eval:
context + continuation are encoded together and split where the context's own encoding ends, no
special tokens added.

Scoring is batched: all (context + ending) sequences are sorted by length, left-padded, and each
batch is one forward that computes logits only where a scored token is predicted (not for the
context or padding), with an fp32 log-softmax a block of rows at a time.

Longer than the model's window (``max_position_embeddings``): a sequence keeps its last
window + 1 tokens (lm-eval's rule, ``truncate_left``): the context is cut first, and only an ending
that alone is too long loses its first tokens, so that ending is scored on its last tokens only
(its first kept token has nothing to predict it from). The result counts both
(``truncated_examples``: an example with any sequence cut; ``truncated_endings``: endings scored
on their last tokens only) and one warning says so. ``acc_norm`` divides a cut ending's
log-likelihood by the characters of the tokens scored, not of the whole ending.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .generation import positions_from_mask
from .jsonl import iter_jsonl, json_type, text_field
from .models.linear import prepacked_weights
from .models.loss import target_logprobs


# ----- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HellaSwagExample:
    context: str
    endings: tuple[str, ...]
    label: int


def clean_text(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: drop WikiHow markers like "[header]", squeeze spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def example_from_record(record: dict, where: str = "record") -> HellaSwagExample:
    """One HellaSwag example from the original fields (activity_label, ctx_a, ctx_b) or a ready ``ctx``."""
    missing = [key for key in ("endings", "label") if key not in record]
    if "ctx_a" in record and "activity_label" in record:
        parts = [text_field(record, key, where) for key in ("activity_label", "ctx_a")]
        context = f"{parts[0]}: {parts[1]} {text_field(record, 'ctx_b', where, '').capitalize()}"
    elif "ctx" in record:
        context = text_field(record, "ctx", where)
    else:
        missing.insert(0, "ctx (or ctx_a + activity_label)")
    if missing:
        raise ValueError(f"{where} lacks HellaSwag field(s) {missing}; it has {sorted(record)}")
    endings = record["endings"]
    if not (isinstance(endings, list) and endings and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: endings must be a non-empty list of strings, got {json_type(endings)}")
    label = gold_label(record["label"], len(endings), where)
    return HellaSwagExample(clean_text(context), tuple(clean_text(e) for e in endings), label)


def gold_label(value, num_endings: int, where: str) -> int:
    """The gold ending's index: an integer, or a string of digits as the hub's copy stores it ("3")."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_endings):
        raise ValueError(f"{where}: label={value!r} must index one of its {num_endings} endings (an integer 0..{num_endings - 1})")
    return value


def load_hellaswag(path: str | Path, limit: int | None = None) -> list[HellaSwagExample]:
    """The first ``limit`` examples (all when None) of a HellaSwag JSONL file."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"HellaSwag file {path} {problem}; pass a JSONL file with ctx/endings/label per line "
            "(or the original ctx_a/ctx_b/activity_label fields)"
        )
    examples = [example_from_record(record, where=where) for where, record in islice(iter_jsonl(path), limit)]
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag examples; pass a JSONL file with one example per line")
    return examples


# ----- scoring -------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split where the context's own encoding ends (lm-eval's way).

    NOTE: trailing spaces of the context move to the continuation, so BPE merges " word" as usual.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    context_len = len(tokenizer.encode(stripped, add_special_tokens=False))
    if context_len == 0:
        raise ValueError(f"context {context!r} encodes to no tokens; scoring needs a non-empty context")
    return whole[:context_len], whole[context_len:]


def truncate_left(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """lm-eval's rule: keep the last ``max_len + 1`` tokens of context + continuation, cutting the
    context first and the continuation's start only when it alone is too long."""
    cut = max(0, len(context) + len(continuation) - 1 - max_len)
    return context[cut:], continuation[max(0, cut - len(context)) :]


def scored_chars(tokenizer, ending: str, continuation: list[int], kept: tuple[list[int], list[int]]) -> int:
    """Characters acc_norm divides by: the ending's, or for an ending cut to the window, those of the
    tokens scored (the first kept token is not scored when no context is left)."""
    context, tokens = kept
    scored = tokens if context else tokens[1:]
    if len(scored) == len(continuation):
        return len(ending)
    return len(tokenizer.decode(scored).strip())


def _left_pad(rows: Sequence[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B,width], mask [B,width]) with each row right-aligned; pad id 0 is never attended to."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _batch_loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair, one forward.

    The head runs only on the positions that predict a scored token (a boolean ``logits_to_keep``):
    not on context or padding positions, whose logits would be thrown away.
    """
    device = model.device
    inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]  # position t predicts token t+1
    # NOTE: with an empty (fully truncated) context the first continuation token has no predictor.
    scored = [cont[len(cont) - min(len(cont), len(inp)) :] for inp, (_, cont) in zip(inputs, pairs)]
    width = max(map(len, inputs))
    ids, mask = _left_pad(inputs, width, device)
    targets, predicts = _left_pad(scored, width, device)  # [B,T]: each row's scored tokens at its end
    predicts = predicts.bool()
    logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=predicts).logits
    logprobs = target_logprobs(logits, targets[predicts])  # [N], row by row
    return [part.sum().item() for part in logprobs.split([len(row) for row in scored])]


def loglikelihoods(
    model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16, progress: bool = True, desc: str = ""
) -> list[float]:
    """Log-likelihood of each continuation given its context, batched by length (longest first)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None:
        pairs = [truncate_left(ctx, cont, max_len) for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results = [0.0] * len(pairs)
    with tqdm(total=len(pairs), desc=desc, unit="seq", disable=not progress) as bar, prepacked_weights(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, value in zip(chunk, _batch_loglikelihoods(model, [pairs[i] for i in chunk])):
                results[i] = value
            bar.update(len(chunk))
    return results


def predictions(lls: Sequence[float], chars: Sequence[int]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood per scored character): acc and acc_norm's picks."""
    per_char = [ll / max(count, 1) for ll, count in zip(lls, chars)]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(per_char)), key=per_char.__getitem__)


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports them."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def evaluate_hellaswag(
    model,
    tokenizer,
    examples: Iterable[HellaSwagExample | dict],
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """acc and acc_norm (with standard errors) of ``model`` on HellaSwag ``examples``, plus throughput.

    ``examples`` may be ``HellaSwagExample``s or raw JSON records. The model is put in eval mode for
    the call and returned to its previous mode, so training loops can call this for validation.
    Sequences longer than the model's window: the module docstring says how they are cut and counted.
    """
    examples = [e if isinstance(e, HellaSwagExample) else example_from_record(e) for e in examples]
    examples = examples[:limit] if limit is not None else examples
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    endings = [ending for ex in examples for ending in ex.endings]
    whole = [encode_pair(tokenizer, ex.context, " " + ending) for ex in examples for ending in ex.endings]
    window = getattr(model.config, "max_position_embeddings", None)
    pairs = [truncate_left(ctx, cont, window) for ctx, cont in whole] if window is not None else whole
    chars = [scored_chars(tokenizer, ending, cont, kept) for ending, (_, cont), kept in zip(endings, whole, pairs)]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        lls = loglikelihoods(model, pairs, batch_size, progress, desc="hellaswag")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    correct, correct_norm, cut, offset = [], [], 0, 0
    for ex in examples:
        span = slice(offset, offset + len(ex.endings))
        pick, pick_norm = predictions(lls[span], chars[span])
        correct.append(float(pick == ex.label))
        correct_norm.append(float(pick_norm == ex.label))
        cut += any(kept != pair for kept, pair in zip(pairs[span], whole[span]))
        offset += len(ex.endings)
    cut_endings = sum(len(kept[1]) < len(pair[1]) or not kept[0] for kept, pair in zip(pairs, whole))
    if cut:
        warnings.warn(
            f"hellaswag: {cut} of {len(examples)} examples exceed the model's window of {window} tokens; their "
            f"contexts were cut from the left, and {cut_endings} endings are scored on their last tokens only",
            stacklevel=2,
        )
    acc, acc_stderr = _mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = _mean_and_stderr(correct_norm)
    tokens = sum(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
    return {
        "task": "hellaswag",
        "num_examples": len(examples),
        "acc": acc,
        "acc_stderr": acc_stderr,
        "acc_norm": acc_norm,
        "acc_norm_stderr": acc_norm_stderr,
        "truncated_examples": cut,
        "truncated_endings": cut_endings,
        "seconds": seconds,
        "examples_per_second": len(examples) / seconds,
        "tokens_per_second": tokens / seconds,
    }
