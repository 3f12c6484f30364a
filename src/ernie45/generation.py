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

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from .checkpoint.safetensors_io import json_object
from .models.kv_cache import KVCache, make_kv_caches  # noqa: F401  (KVCache: re-exported, its old home)
from .models.linear import prepacked_weights

if TYPE_CHECKING:  # NOTE: importing it costs ~0.9 s and ~85 MB of host memory (sympy, dynamo): only generate needs it
    from transformers.generation.utils import GenerateDecoderOnlyOutput


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
    """The default of a generation setting: what the generation config says (``generation_config=``,
    else the model's, else transformers' defaults). A value given, None too, wins, as in
    transformers (``generate(..., eos_token_id=None)`` ends on no token)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT = _ModelDefault()

# transformers' defaults for what neither the call nor a generation config sets (its
# ``GenerationConfig._get_default_generation_params``); max_new_tokens None: 20 new tokens.
DEFAULT_SETTINGS = dict(
    max_new_tokens=None, max_length=None, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, min_p=None,
    typical_p=None, epsilon_cutoff=None, eta_cutoff=None,
    repetition_penalty=1.0, min_new_tokens=None, min_length=0, num_beams=1, num_return_sequences=1,
    no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
)  # fmt: skip


def resolve_settings(model, generation_config: GenerationConfig | None, given: dict) -> dict:
    """One call's settings with transformers' precedence: keywords given (None too), then
    ``generation_config``, then the model's generation config, then ``DEFAULT_SETTINGS``."""
    settings = dict(DEFAULT_SETTINGS)
    for source in (getattr(model, "generation_config", None), generation_config):
        if source is not None:
            settings.update({name: value for name in DEFAULT_SETTINGS if (value := getattr(source, name, None)) is not None})
    settings.update({name: value for name, value in given.items() if value is not MODEL_DEFAULT})
    return settings


def default_special_ids(model) -> tuple[list[int], int | None]:
    """(end token ids, pad id) from the model's generation config, else from its model config."""
    source = getattr(model, "generation_config", None) or model.config
    return _as_id_list(getattr(source, "eos_token_id", None)), getattr(source, "pad_token_id", None)


def resolve_special_ids(
    model,
    eos_token_id: int | list[int] | None | _ModelDefault,
    pad_token_id: int | None | _ModelDefault,
    generation_config: GenerationConfig | None = None,
) -> tuple[list[int], int | None]:
    """(end ids, pad id) for one call: given values (None too) win over ``generation_config``'s, then
    the model's (``MODEL_DEFAULT``); no pad falls back to the first end id."""
    default_end, default_pad = default_special_ids(model)
    if generation_config is not None:
        default_end = _as_id_list(generation_config.eos_token_id) or default_end
        default_pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else default_pad
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
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    # transformers' own warpers after top-p, built (and so checked) once: see tail_warpers
    warpers: tuple[Callable, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature={self.temperature!r} must be a number > 0 and finite (use do_sample=False for greedy decoding)"
            )
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None to keep every token")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1], or None to keep every token")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1], or None to keep every token")
        object.__setattr__(self, "warpers", tuple(self.tail_warpers()))  # NOTE: a frozen dataclass

    def tail_warpers(self) -> list[Callable]:
        """transformers' own warpers after top-p, in its order: min_p, typical_p, epsilon_cutoff, eta_cutoff
        (each on when transformers turns it on; their classes check the values). NOTE: eta's cutoff is a
        0-dim CPU tensor, which torch combines with logits on any device."""
        from transformers.generation import logits_process as lp

        warpers: list[Callable] = []
        try:
            if self.min_p is not None:
                warpers.append(lp.MinPLogitsWarper(min_p=self.min_p))
            if self.typical_p is not None and self.typical_p < 1.0:
                warpers.append(lp.TypicalLogitsWarper(mass=self.typical_p))
            if self.epsilon_cutoff is not None and 0.0 < self.epsilon_cutoff < 1.0:
                warpers.append(lp.EpsilonLogitsWarper(epsilon=self.epsilon_cutoff))
            if self.eta_cutoff is not None and 0.0 < self.eta_cutoff < 1.0:
                warpers.append(lp.EtaLogitsWarper(epsilon=self.eta_cutoff))
        except (TypeError, ValueError) as err:
            raise ValueError(" ".join(str(err).split())) from None
        return warpers


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
    """Temperature, then top-k, then top-p, then min-p, typical-p, epsilon and eta cutoffs (transformers'
    order) on fp32 logits [B,V]."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = filter_top_k(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = filter_top_p(logits, sampling.top_p)
    for warper in sampling.warpers:
        logits = warper(None, logits)  # NOTE: transformers' own warpers; they read no ids
    return logits


def processed_scores(sampling: Sampling, logits: torch.Tensor) -> torch.Tensor:
    """The scores a token is chosen from: ``logits`` [B,V] themselves for greedy decoding, else tempered
    and filtered (transformers' ``scores`` of a step)."""
    return sampling_logits(logits, sampling) if sampling.do_sample else logits


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
def _streamed(tokens: Iterator[torch.Tensor], input_ids: torch.Tensor, streamer) -> Iterator[torch.Tensor]:
    """``tokens`` passed on, each also handed to ``streamer`` (as transformers' generate does)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"a streamer takes one prompt row, got {input_ids.shape[0]}")
    streamer.put(input_ids.cpu())
    for token in tokens:
        streamer.put(token.cpu())
        yield token
    streamer.end()


def stream_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
    do_sample: bool | _ModelDefault = MODEL_DEFAULT,
    temperature: float | _ModelDefault = MODEL_DEFAULT,
    top_k: int | None | _ModelDefault = MODEL_DEFAULT,
    top_p: float | None | _ModelDefault = MODEL_DEFAULT,
    eos_token_id: int | list[int] | None | _ModelDefault = MODEL_DEFAULT,
    pad_token_id: int | None | _ModelDefault = MODEL_DEFAULT,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_length: int | None | _ModelDefault = MODEL_DEFAULT,
    stopping_criteria=None,
    use_cache: bool = True,
    repetition_penalty: float | None | _ModelDefault = MODEL_DEFAULT,
    min_new_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
    min_length: int | None | _ModelDefault = MODEL_DEFAULT,
    num_beams: int | _ModelDefault = MODEL_DEFAULT,
    num_return_sequences: int | _ModelDefault = MODEL_DEFAULT,
    min_p: float | None | _ModelDefault = MODEL_DEFAULT,
    typical_p: float | None | _ModelDefault = MODEL_DEFAULT,
    epsilon_cutoff: float | None | _ModelDefault = MODEL_DEFAULT,
    eta_cutoff: float | None | _ModelDefault = MODEL_DEFAULT,
    no_repeat_ngram_size: int | _ModelDefault = MODEL_DEFAULT,
    bad_words_ids: list[list[int]] | None | _ModelDefault = MODEL_DEFAULT,
    suppress_tokens: list[int] | None | _ModelDefault = MODEL_DEFAULT,
    begin_suppress_tokens: list[int] | None | _ModelDefault = MODEL_DEFAULT,
    generation_config: GenerationConfig | None = None,
    logits_processor=None,
    step_scores: list | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], step by step (see ``generate`` for the arguments).
    ``step_scores``: a list that gets (logits, scores) [B,V] fp32 per step, transformers' ``logits``
    (as the model gave them) and ``scores`` (after the processors and, when sampling, the warpers)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be an integer tensor [batch, seq], got a {type(input_ids).__name__}; "
            "e.g. torch.tensor([ids])"
        )
    del use_cache  # NOTE: accepted for transformers' callers; decoding always uses the KV cache (the same tokens)
    given = dict(
        max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens, min_length=min_length,
        num_beams=num_beams, num_return_sequences=num_return_sequences, no_repeat_ngram_size=no_repeat_ngram_size,
        bad_words_ids=bad_words_ids, suppress_tokens=suppress_tokens, begin_suppress_tokens=begin_suppress_tokens,
    )  # fmt: skip
    settings = resolve_settings(model, generation_config, given)
    if settings["num_beams"] != 1:
        raise ValueError(f"num_beams={settings['num_beams']!r}: beam search is not supported; use num_beams=1 (greedy or sampling)")
    # NOTE: as in transformers, with no length set anywhere: 20 new tokens, within max_position_embeddings
    default, room = 20, getattr(model.config, "max_position_embeddings", None)
    if room is not None and room > input_ids.shape[-1]:
        default = min(default, room - input_ids.shape[-1])
    budget = new_token_budget(settings["max_new_tokens"], settings["max_length"], input_ids.shape[-1], default)
    if not (isinstance(budget, int) and budget >= 1):
        raise ValueError(f"max_new_tokens={budget!r} must be an integer >= 1")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    # NOTE: greedy decoding checks only the sampling values given to the call: a generation config's
    # (e.g. temperature=0.0 beside do_sample=False) is ignored, as transformers ignores it
    chosen = settings if settings["do_sample"] else DEFAULT_SETTINGS | {k: v for k, v in given.items() if v is not MODEL_DEFAULT}
    sampling = Sampling(
        settings["do_sample"], chosen["temperature"], chosen["top_k"], chosen["top_p"], chosen["min_p"],
        chosen["typical_p"], chosen["epsilon_cutoff"], chosen["eta_cutoff"],
    )  # fmt: skip
    choose = token_chooser(sampling, generator)
    end_ids, pad_id = resolve_special_ids(model, eos_token_id, pad_token_id, generation_config)
    keep = prompt_mask(input_ids, attention_mask, pad_id, end_ids)
    input_ids, keep = repeated_rows(input_ids, keep, settings["num_return_sequences"], sampling.do_sample)
    adjust = with_processors(
        logits_adjustment(settings["repetition_penalty"], fewest_new_tokens(settings, input_ids.shape[1]), end_ids, keep),
        transformers_processors(settings, end_ids, input_ids.shape[1], input_ids.device)
        + callables(logits_processor, "logits_processor", "(input_ids, scores) -> scores, e.g. a transformers LogitsProcessorList"),
    )
    stop = criteria_check(stopping_criteria)
    scores_of = partial(processed_scores, sampling)
    return _decode(model, input_ids, keep, budget, choose, end_ids, pad_id, stop, adjust, scores_of, step_scores)


def repeated_rows(
    input_ids: torch.Tensor, keep: torch.Tensor, copies: int, do_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``num_return_sequences``: each prompt row ``copies`` times in a row (sampling only)."""
    if not (isinstance(copies, int) and copies >= 1):
        raise ValueError(f"num_return_sequences={copies!r} must be an integer >= 1")
    if copies == 1:
        return input_ids, keep
    if not do_sample:
        raise ValueError(f"num_return_sequences={copies} needs do_sample=True: greedy decoding gives one sequence per prompt")
    return input_ids.repeat_interleave(copies, dim=0), keep.repeat_interleave(copies, dim=0)


def fewest_new_tokens(settings: dict, prompt_len: int) -> int | None:
    """How many new tokens must come before an end token: ``min_new_tokens``, else transformers'
    older ``min_length`` (prompt + new tokens, the prompt's left padding included, as transformers
    counts it). As in transformers, ``min_new_tokens`` wins when both are set."""
    least, total = settings["min_new_tokens"], settings["min_length"]
    if least is not None or total is None or total == 0:
        return least
    if not (isinstance(total, int) and total >= 0):
        raise ValueError(f"min_length={total!r} must be an integer >= 0 (prompt + new tokens; or pass min_new_tokens)")
    return max(total - prompt_len, 0)


def logits_adjustment(
    repetition_penalty: float | None, min_new_tokens: int | None, end_ids: list[int], prompt_keep: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """transformers' logits processors that run before token choice, as one function
    (logits [B,V], sequences so far [B,T], step) -> logits: the end tokens barred until
    ``min_new_tokens`` are out, and tokens already in the sequence (its left padding aside, as
    transformers leaves it) made less likely by ``repetition_penalty`` (a positive logit divided by
    it, a negative one multiplied). None when neither applies."""
    penalty = 1.0 if repetition_penalty is None else repetition_penalty
    if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1.0 = none)")
    if min_new_tokens is not None and not (isinstance(min_new_tokens, int) and min_new_tokens >= 0):
        raise ValueError(f"min_new_tokens={min_new_tokens!r} must be an integer >= 0")
    bar_until = min_new_tokens if end_ids and min_new_tokens else 0
    if penalty == 1.0 and bar_until == 0:
        return None
    padding = prompt_keep.long().argmax(dim=1)  # [B] leading pad tokens (each row has a real token)

    def adjust(logits: torch.Tensor, sequences: torch.Tensor, step: int) -> torch.Tensor:
        if step < bar_until:
            logits = logits.clone()
            logits[:, end_ids] = float("-inf")
        if penalty != 1.0:
            vocab = logits.shape[-1]
            # NOTE: left padding points at an extra column, dropped after the scatter
            ids = sequences.masked_fill(torch.arange(sequences.shape[1], device=sequences.device) < padding[:, None], vocab)
            padded = torch.nn.functional.pad(logits, (0, 1))
            seen = padded.gather(1, ids)
            logits = padded.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))[:, :vocab]
        return logits

    return adjust


def new_token_budget(max_new_tokens: int | None, max_length: int | None, prompt_len: int, default: int = 20) -> int:
    """New tokens to generate: ``max_new_tokens`` (it wins, as in transformers), else what
    ``max_length`` (prompt + new) leaves after the prompt, else ``default``."""
    if max_new_tokens is not None or max_length is None:
        return default if max_new_tokens is None else max_new_tokens
    if not (isinstance(max_length, int) and max_length > prompt_len):
        raise ValueError(
            f"max_length={max_length!r} (prompt + new tokens) leaves no room after the prompt's {prompt_len} "
            "tokens; pass a larger max_length or max_new_tokens"
        )
    return max_length - prompt_len


def callables(given, name: str, what: str) -> list[Callable]:
    """transformers' list-or-one argument (``stopping_criteria``, ``logits_processor``) as a list of callables."""
    if given is None:
        return []
    items = list(given) if isinstance(given, (list, tuple)) else [given]
    if not all(callable(item) for item in items):
        raise ValueError(f"{name} must be callables {what}")
    return items


def transformers_processors(settings: dict, end_ids: list[int], prompt_len: int, device: torch.device) -> list[Callable]:
    """transformers' own processors for the keywords ernie45 hands to them: ``no_repeat_ngram_size``,
    ``bad_words_ids``, ``suppress_tokens``, ``begin_suppress_tokens`` (each bars tokens; after the
    repetition penalty, as in transformers)."""
    from transformers.generation import logits_process as lp

    processors: list[Callable] = []
    ngram = settings["no_repeat_ngram_size"]
    if ngram is not None and not (isinstance(ngram, int) and not isinstance(ngram, bool) and ngram >= 0):
        raise ValueError(f"no_repeat_ngram_size={ngram!r} must be an integer >= 0 (0: off)")
    try:
        if ngram:
            processors.append(lp.NoRepeatNGramLogitsProcessor(ngram))
        if settings["bad_words_ids"] is not None:
            processors.append(lp.NoBadWordsLogitsProcessor(settings["bad_words_ids"], eos_token_id=end_ids or None))
        if settings["suppress_tokens"] is not None:
            processors.append(lp.SuppressTokensLogitsProcessor(settings["suppress_tokens"], device=device))
        if settings["begin_suppress_tokens"] is not None:
            processors.append(lp.SuppressTokensAtBeginLogitsProcessor(settings["begin_suppress_tokens"], prompt_len, device=device))
    except (TypeError, ValueError) as err:
        raise ValueError(" ".join(str(err).split())) from None
    return processors


def with_processors(
    adjust: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None, processors: list[Callable]
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """``adjust`` followed by ``processors``, each (sequences [B,T], scores [B,V]) -> scores: the barring
    keywords' then the caller's ``logits_processor``, transformers' order (the sampling warpers come after)."""
    if not processors:
        return adjust

    def adjusted(logits: torch.Tensor, sequences: torch.Tensor, step: int) -> torch.Tensor:
        if adjust is not None:
            logits = adjust(logits, sequences, step)
        for processor in processors:
            logits = processor(sequences, logits)
        return logits

    return adjusted


def criteria_check(stopping_criteria) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """transformers' ``stopping_criteria`` (a ``StoppingCriteriaList``, a list of criteria or one)
    as one check: (sequences so far [B,T], this step's logits [B,V]) -> rows done [B] bool."""
    criteria = callables(stopping_criteria, "stopping_criteria", "(input_ids, scores) -> bool, e.g. a transformers StoppingCriteriaList")
    if not criteria:
        return None

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
    stop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    adjust: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None,
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    record: list | None,
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
    sequences = input_ids  # [B,P+s]: what stopping criteria and the repetition penalty look at
    tokens, positions = input_ids, positions_from_mask(prompt_keep)  # [B,P] for the prefill
    with prepacked_weights(model):
        for step in range(max_new_tokens):
            mask = full_mask[:, : prompt_len + step] if padded else None
            raw = logits = _decode_step_logits(model, tokens, positions, mask, caches)  # [B,V]
            if adjust is not None:
                logits = adjust(logits, sequences, step)
            if record is not None:  # NOTE: transformers' scores of a step are after the warpers too
                record.append((raw, scores_of(logits)))
            next_tokens = choose(logits)  # [B]
            if end_ids:
                next_tokens = next_tokens.masked_fill(done, pad_id)
                done |= torch.isin(next_tokens, end_ids_t)
            yield next_tokens
            if stop is not None or adjust is not None:
                sequences = torch.cat([sequences, next_tokens[:, None].to(sequences.dtype)], dim=1)
            if stop is not None:
                done |= stop(sequences, logits)
            if (end_ids or stop is not None) and bool(done.all()):
                return
            tokens, positions = next_tokens[:, None], positions[:, -1:] + 1  # [B,1]


def check_generate_keywords(settings: dict) -> None:
    """A TypeError naming transformers' generate keywords ernie45 does not take, and what to do instead."""
    accepted = set(inspect.signature(stream_tokens).parameters) - {"model", "input_ids", "attention_mask", "step_scores"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise TypeError(
            f"generate() got unsupported keyword argument(s) {unknown}; ernie45's generate takes "
            f"{', '.join(sorted(accepted | {'streamer', 'return_dict_in_generate', 'output_scores', 'output_logits'}))}. "
            "Other transformers logits processors can be passed as objects: "
            "logits_processor=[NoRepeatNGramLogitsProcessor(3), ...]"
        )


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    **settings,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Continue left-padded prompts input_ids [B,P]; returns prompt + new tokens [B,P+N], N <= max_new_tokens
    (``num_return_sequences`` n: [B*n,P+N], each prompt's rows together).

    ``settings`` are ``stream_tokens``' keywords, transformers' names and meanings: max_new_tokens,
    max_length (prompt + new tokens, when max_new_tokens is not given), min_new_tokens, min_length
    (prompt + new tokens before an end token may come), do_sample,
    temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, repetition_penalty,
    no_repeat_ngram_size, bad_words_ids,
    suppress_tokens, begin_suppress_tokens, num_return_sequences (sampling), num_beams (1
    only), eos_token_id, pad_token_id, stopping_criteria (called with the sequences so far and the
    step's logits after each token), use_cache (decoding always uses the KV cache: the same tokens
    either way), generation_config; plus generator or seed for reproducible sampling.
    What a call does not give comes, as in transformers, from ``generation_config``, else the
    model's generation config (its checkpoint's generation_config.json: a release's recommended
    sampling settings, when it has them), else transformers' defaults (greedy, 20 new tokens; top_k=50
    when sampling). ``eos_token_id=None`` or ``[]`` disables ending. Rows that have ended are
    padded with pad_token_id and decoding stops once all rows have ended.
    Sampling applies temperature, then top_k, top_p, min_p, typical_p, epsilon_cutoff and eta_cutoff (transformers'
    order); greedy decoding ignores (but still
    checks) the sampling values. ``streamer`` (transformers' ``TextStreamer`` and kin, one prompt
    row) is given the prompt, then each new token as it comes, then ``end()``.
    ``logits_processor``: transformers' ``LogitsProcessorList`` (or callables (input_ids, scores) ->
    scores) run after the built-in processors and before the sampling warpers, as transformers runs them
    (e.g. ``NoRepeatNGramLogitsProcessor``, ``NoBadWordsLogitsProcessor``, constrained decoding).
    ``return_dict_in_generate``: transformers' ``GenerateDecoderOnlyOutput`` instead of the tensor,
    with per-step ``scores`` (``output_scores``) and ``logits`` (``output_logits``), [B,V] fp32 each.
    """
    check_generate_keywords(settings)
    recorded = [] if return_dict_in_generate and (output_scores or output_logits) else None
    tokens = stream_tokens(model, input_ids, attention_mask, step_scores=recorded, **settings)
    if streamer is not None:
        tokens = _streamed(tokens, input_ids, streamer)
    new_tokens = torch.stack(list(tokens), dim=1)  # [B*n,N]
    prompts = input_ids.repeat_interleave(new_tokens.shape[0] // input_ids.shape[0], dim=0)  # n: num_return_sequences
    sequences = torch.cat([prompts, new_tokens.to(input_ids.dtype)], dim=1)
    if not return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(scores for _, scores in recorded) if output_scores else None,
        logits=tuple(logits for logits, _ in recorded) if output_logits else None,
    )
