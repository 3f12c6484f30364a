"""Token generation with a preallocated KV cache: greedy and sampled decoding of left-padded batches.

How one ``generate`` call runs:
  1. one ``KVCache`` per layer, allocated once at prefill for prompt + max_new_tokens positions;
  2. prefill: a single forward over the whole prompt fills the caches; only the last position's
     logits are computed (``logits_to_keep=1``);
  3. decode: one forward per new token, over that token alone, attending to the cache.
Positions and padding follow transformers' ``generate``: a row's first real token sits at position
0 (cumsum of the attention mask minus 1), finished rows are filled with ``pad_token_id``, and
decoding stops early once every row has produced an end token. Greedy output is therefore
token-identical to transformers'.

Shapes: B batch, P prompt length, N new tokens, V vocabulary, nKV key/value heads, hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from .checkpoint.safetensors_io import json_object
from .models.kv_cache import KVCache, make_kv_caches  # noqa: F401  (KVCache: re-exported, its old home)
from .models.linear import prepacked_weights


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,S] HF mask (1 = real) -> position ids [B,S]: real tokens count from 0, padding gets 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


# ----- end and pad tokens --------------------------------------------------------------------------
def load_generation_config(path: str | Path) -> GenerationConfig | None:
    """The checkpoint's generation_config.json, or None when the directory has none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return None
    json_object(file.read_bytes(), file)  # NOTE: empty, not JSON or not an object: one line naming it
    return GenerationConfig.from_pretrained(str(path))


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class _ModelDefault:
    """The default of ``eos_token_id`` / ``pad_token_id``: the model's. An explicit None means none,
    as in transformers (``generate(..., eos_token_id=None)`` ends on no token)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT = _ModelDefault()


def default_special_ids(model) -> tuple[list[int], int | None]:
    """(end token ids, pad id) from the model's generation config, else from its model config."""
    source = getattr(model, "generation_config", None) or model.config
    return _as_id_list(getattr(source, "eos_token_id", None)), getattr(source, "pad_token_id", None)


def resolve_special_ids(
    model, eos_token_id: int | list[int] | None | _ModelDefault, pad_token_id: int | None | _ModelDefault
) -> tuple[list[int], int | None]:
    """(end ids, pad id) for one call: given values (None too) win over the model's (``MODEL_DEFAULT``);
    no pad falls back to the first end id."""
    default_end, default_pad = default_special_ids(model)
    end_ids = default_end if eos_token_id is MODEL_DEFAULT else _as_id_list(eos_token_id)
    pad_id = default_pad if pad_token_id is MODEL_DEFAULT else pad_token_id
    if pad_id is None and end_ids:
        pad_id = end_ids[0]  # transformers' fallback
    vocab = model.config.vocab_size
    for name, ids in (("eos_token_id", end_ids), ("pad_token_id", _as_id_list(pad_id))):
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"{name}={ids} is out of range for vocab_size={vocab} (valid ids: 0..{vocab - 1})")
    return end_ids, pad_id


# ----- choosing the next token ---------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How to pick the next token: argmax, or a draw from the tempered, top-k/top-p filtered softmax."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature={self.temperature!r} must be a number > 0 and finite (use do_sample=False for greedy decoding)"
            )
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None to keep every token")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1], or None to keep every token")


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [B,V]: everything below the k-th largest becomes -inf (ties with it are kept)."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B,1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [B,V]: keep the most probable tokens until their mass reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' order) on fp32 logits [B,V]."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = filter_top_k(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = filter_top_p(logits, sampling.top_p)
    return logits


def token_chooser(sampling: Sampling, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function fp32 logits [B,V] -> next token ids [B]."""
    if not sampling.do_sample:
        return lambda logits: logits.argmax(dim=-1)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = sampling_logits(logits, sampling).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return draw


# ----- checking the prompt -------------------------------------------------------------------------
def prompt_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None, end_ids: list[int]
) -> torch.Tensor:
    """The prompt's HF attention mask [B,P], checked to be left padding with a real token per row.

    As in transformers, a missing mask is inferred from pad tokens when pad_id is no end token.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token per row")
    if attention_mask is None:
        if pad_id is None or pad_id in end_ids or not bool((input_ids == pad_id).any()):
            return torch.ones_like(input_ids)
        attention_mask = input_ids != pad_id
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} must equal input_ids shape {list(input_ids.shape)}"
        )
    empty_rows = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"prompt row(s) {empty_rows} have no real token (attention_mask is all 0)")
    right_padded = (~attention_mask[:, -1].bool()).nonzero().flatten().tolist()
    if right_padded:
        raise ValueError(
            f"prompt row(s) {right_padded} end in padding: pad prompts on the left "
            "(tokenizer.padding_side = 'left') so every row continues from its last real token"
        )
    return attention_mask.long()


# ----- the decoding loop ---------------------------------------------------------------------------
def stream_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None | _ModelDefault = MODEL_DEFAULT,
    pad_token_id: int | None | _ModelDefault = MODEL_DEFAULT,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_length: int | None = None,
    stopping_criteria=None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], step by step (see ``generate`` for the arguments)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be an integer tensor [batch, seq], got a {type(input_ids).__name__}; "
            "e.g. torch.tensor([ids])"
        )
    del use_cache  # NOTE: accepted for transformers' callers; decoding always uses the KV cache (the same tokens)
    max_new_tokens = new_token_budget(max_new_tokens, max_length, input_ids.shape[-1])
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    choose = token_chooser(Sampling(do_sample, temperature, top_k, top_p), generator)
    end_ids, pad_id = resolve_special_ids(model, eos_token_id, pad_token_id)
    keep = prompt_mask(input_ids, attention_mask, pad_id, end_ids)
    stop = criteria_check(stopping_criteria)
    return _decode(model, input_ids, keep, max_new_tokens, choose, end_ids, pad_id, stop)


def new_token_budget(max_new_tokens: int | None, max_length: int | None, prompt_len: int) -> int:
    """New tokens to generate: ``max_new_tokens`` (it wins, as in transformers), else what
    ``max_length`` (prompt + new) leaves after the prompt, else 20."""
    if max_new_tokens is not None or max_length is None:
        return 20 if max_new_tokens is None else max_new_tokens
    if not (isinstance(max_length, int) and max_length > prompt_len):
        raise ValueError(
            f"max_length={max_length!r} (prompt + new tokens) leaves no room after the prompt's {prompt_len} "
            "tokens; pass a larger max_length or max_new_tokens"
        )
    return max_length - prompt_len


def criteria_check(stopping_criteria) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """transformers' ``stopping_criteria`` (a ``StoppingCriteriaList``, a list of criteria or one)
    as one check: (sequences so far [B,T], this step's logits [B,V]) -> rows done [B] bool."""
    if stopping_criteria is None:
        return None
    criteria = list(stopping_criteria) if isinstance(stopping_criteria, (list, tuple)) else [stopping_criteria]
    if not all(callable(criterion) for criterion in criteria):
        raise ValueError("stopping_criteria must be callables (input_ids, scores) -> bool, e.g. a transformers StoppingCriteriaList")

    def done(sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        for criterion in criteria:  # NOTE: a criterion may answer for all rows (a bool) or per row ([B])
            rows |= torch.as_tensor(criterion(sequences, scores), dtype=torch.bool, device=sequences.device)
        return rows

    return done


@torch.no_grad()
def _decode_step_logits(model, tokens, positions, mask, caches) -> torch.Tensor:
    out = model(tokens, position_ids=positions, attention_mask=mask, cache=caches, logits_to_keep=1)
    return out.logits[:, -1].float()  # [B,V]


def _decode(
    model,
    input_ids: torch.Tensor,
    prompt_keep: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    end_ids: list[int],
    pad_id: int | None,
    stop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    # NOTE: a generator function of its own, so that argument errors above raise at the call.
    # done: rows ended by an end token or a stopping criterion. As in transformers they are padded
    # from then on only while end tokens are on; otherwise they go on until every row is done.
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    caches = make_kv_caches(model.config.num_hidden_layers, prompt_len + max_new_tokens)
    # One mask buffer for the whole run; step s sees its first P + s columns (a view, no concat).
    padded = not bool(prompt_keep.all())
    full_mask = None
    if padded:
        full_mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = prompt_keep
    end_ids_t = torch.tensor(end_ids, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    sequences = input_ids  # [B,P+s]: what stopping criteria look at
    tokens, positions = input_ids, positions_from_mask(prompt_keep)  # [B,P] for the prefill
    with prepacked_weights(model):
        for step in range(max_new_tokens):
            mask = full_mask[:, : prompt_len + step] if padded else None
            logits = _decode_step_logits(model, tokens, positions, mask, caches)  # [B,V]
            next_tokens = choose(logits)  # [B]
            if end_ids:
                next_tokens = next_tokens.masked_fill(done, pad_id)
                done |= torch.isin(next_tokens, end_ids_t)
            yield next_tokens
            if stop is not None:
                sequences = torch.cat([sequences, next_tokens[:, None].to(sequences.dtype)], dim=1)
                done |= stop(sequences, logits)
            if (end_ids or stop is not None) and bool(done.all()):
                return
            tokens, positions = next_tokens[:, None], positions[:, -1:] + 1  # [B,1]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """Continue left-padded prompts input_ids [B,P]; returns prompt + new tokens [B,P+N], N <= max_new_tokens.

    ``settings`` are ``stream_tokens``' keywords: max_new_tokens (20), do_sample (False),
    temperature, top_k, top_p, eos_token_id, pad_token_id, generator, seed; and transformers'
    max_length (prompt + new tokens, when max_new_tokens is not given), stopping_criteria (called
    with the sequences so far and the step's logits after each token, as transformers does) and
    use_cache (decoding always uses the KV cache: the same tokens either way).
    eos_token_id / pad_token_id default to the model's generation config (else its config);
    ``eos_token_id=None`` (as in transformers) or ``[]`` disables ending. Rows that have ended are
    padded with pad_token_id and decoding stops once all rows have ended.
    Sampling (do_sample=True) applies temperature, then top_k, then top_p; ``seed`` or
    ``generator`` makes it reproducible. Greedy decoding ignores (but still checks) the sampling values.
    """
    new_tokens = torch.stack(list(stream_tokens(model, input_ids, attention_mask, **settings)), dim=1)  # [B,N]
    return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
