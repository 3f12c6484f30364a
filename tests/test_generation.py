"""KV-cache generation: greedy parity with transformers' generate, cached vs uncached steps, sampling."""

from __future__ import annotations

import types

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextIteratorStreamer
from transformers import Ernie4_5ForCausalLM as HFErnie
from transformers.generation.logits_process import LogitsProcessorList, NoRepeatNGramLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

import ernie45
from ernie45 import BackendConfig
from ernie45.generation import (
    KVCache,
    Sampling,
    filter_top_k,
    filter_top_p,
    positions_from_mask,
    resolve_settings,
    sampling_logits,
    token_chooser,
)

from builders import VARIED, random_hf_model, tiny_dense_config

NEW_TOKENS = 24


def _dense_pair(tmp_path, backend=None):
    hf = random_hf_model(HFErnie, tiny_dense_config(**VARIED))
    hf.save_pretrained(tmp_path)
    return hf, ernie45.from_pretrained(tmp_path, backend=backend)


def _left_padded_prompts(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [3,9]: rows with 3, 0 and 7 pad tokens (id 0) on the left."""
    ids = torch.randint(3, vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_greedy_parity(hf, ours, ending: str) -> None:
    """ours.generate == hf.generate on left-padded prompts, 24 new tokens; ``ending`` picks the end-token case."""
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    if ending == "one_row_ends_early":
        # End on the token row 1 produces 5th, so rows end at different steps and get padded.
        first_run = ours.generate(ids, attention_mask=mask, eos_token_id=[], **kwargs)
        kwargs["eos_token_id"] = int(first_run[1, 9 + 4])
    masks = {} if ending == "mask_inferred_from_pad" else {"attention_mask": mask}

    expected = hf.generate(ids, **masks, **kwargs)
    got = ours.generate(ids, **masks, **kwargs)

    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    if ending == "one_row_ends_early":
        assert (got[1, 9 + 5 :] == hf.config.pad_token_id).all()


@pytest.mark.parametrize(
    "attn, ending",
    [("sdpa", "config_eos"), ("sdpa", "one_row_ends_early"), ("sdpa", "mask_inferred_from_pad"), ("eager", "one_row_ends_early")],
)
def test_greedy_matches_transformers_generate(tmp_path, attn, ending):
    assert_greedy_parity(*_dense_pair(tmp_path, BackendConfig(attn=attn)), ending)


class EndsAt(StoppingCriteria):
    """Done for each row whose last token is ``token`` (a per-row answer, as transformers' own criteria)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_max_length_and_stopping_criteria_match_transformers_generate(tmp_path):
    """transformers' keywords that other libraries pass (lm-eval's generate_until does): max_length
    counts the prompt; a stopping criterion ends a row (padded after it, as the end token does)
    and the call once every row is done; use_cache is accepted."""
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    expected = hf.generate(ids, attention_mask=mask, max_length=9 + 12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_length=9 + 12, do_sample=False, use_cache=True)
    assert got.shape == (3, 9 + 12) and torch.equal(got, expected)

    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    token = int(plain[1, 9 + 3])  # row 1's 4th new token: rows stop at different steps
    criteria = StoppingCriteriaList([EndsAt(token)])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, stopping_criteria=criteria)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, stopping_criteria=criteria)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert (got[1, 9 + 4 :] == hf.config.pad_token_id).all()


def test_an_explicit_none_end_token_means_none_as_in_transformers(tmp_path):
    """``eos_token_id=None`` given ends on no token (transformers' generate), while leaving it out
    takes the model's generation config."""
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    token = int(plain[1, 9 + 4])
    for model in (hf, ours):
        model.generation_config.eos_token_id = token
    for given in ({}, dict(eos_token_id=None)):
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **given)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **given)
        assert got.shape == expected.shape and torch.equal(got, expected), given
    assert torch.equal(got, plain)  # the last call, with eos_token_id=None, ran every row to the end


def test_unset_settings_come_from_the_generation_config_as_in_transformers(tmp_path):
    """What a call leaves out comes from ``generation_config=``, else the model's generation config,
    else transformers' defaults; a keyword given wins. Checked token for token against transformers
    (sampling with top_k=1 is deterministic: it must pick the argmax)."""
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    for model in (hf, ours):
        model.generation_config = GenerationConfig(**model.generation_config.to_dict() | dict(do_sample=True, top_k=1, max_new_tokens=7))
    expected = hf.generate(ids, attention_mask=mask)
    got = ours.generate(ids, attention_mask=mask)
    assert got.shape == expected.shape == (3, 9 + 7) and torch.equal(got, expected) and torch.equal(got, greedy)
    passed = GenerationConfig(max_new_tokens=5, do_sample=False)
    expected = hf.generate(ids, attention_mask=mask, generation_config=passed)
    got = ours.generate(ids, attention_mask=mask, generation_config=passed)
    assert got.shape == expected.shape == (3, 9 + 5) and torch.equal(got, expected)
    assert ours.generate(ids, attention_mask=mask, generation_config=passed, max_new_tokens=3).shape == (3, 9 + 3)
    for model in (hf, ours):  # a max_length from a config counts the prompt too
        model.generation_config = GenerationConfig(**model.generation_config.to_dict() | dict(max_new_tokens=None, max_length=13))
    expected, got = hf.generate(ids, attention_mask=mask), ours.generate(ids, attention_mask=mask)
    assert got.shape == expected.shape == (3, 13) and torch.equal(got, expected)
    for model in (hf, ours):  # greedy ignores a config's sampling values, even invalid ones
        model.generation_config = GenerationConfig(**model.generation_config.to_dict() | dict(temperature=0.0, top_k=None))
    expected, got = hf.generate(ids, attention_mask=mask, do_sample=False), ours.generate(ids, attention_mask=mask, do_sample=False)
    assert torch.equal(got, expected)
    for model in (hf, ours):
        model.generation_config = GenerationConfig(**model.generation_config.to_dict() | dict(temperature=0.8, top_k=1))
    settings = resolve_settings(ours, None, {})
    assert settings["do_sample"] and settings["top_k"] == 1 and settings["top_p"] == 1.0 and settings["repetition_penalty"] == 1.0
    assert resolve_settings(ours, GenerationConfig(top_k=None), {})["top_k"] == 1
    assert resolve_settings(types.SimpleNamespace(), None, {})["top_k"] == 50  # transformers' default when sampling


def test_the_default_length_stays_within_max_position_embeddings_as_in_transformers(tmp_path):
    hf = random_hf_model(HFErnie, tiny_dense_config(**VARIED, max_position_embeddings=12))
    hf.save_pretrained(tmp_path)
    ours = ernie45.from_pretrained(tmp_path)
    ids = torch.randint(3, 160, (1, 9))
    expected, got = hf.generate(ids, do_sample=False, eos_token_id=None), ours.generate(ids, do_sample=False, eos_token_id=None)
    assert got.shape == expected.shape == (1, 12) and torch.equal(got, expected)  # 3 new tokens, not 20


LENGTH_AND_PENALTY = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(min_new_tokens=10),
    dict(min_length=9 + 10),  # transformers' older form: prompt (9, left padding included) + new tokens
    dict(min_length=9 + 4, min_new_tokens=10),  # both set: min_new_tokens wins, as in transformers
    dict(min_length=9 + 10, min_new_tokens=2),
    dict(min_length=5),  # shorter than the prompt: nothing barred
]


@pytest.mark.parametrize("settings", LENGTH_AND_PENALTY)
def test_repetition_penalty_and_min_new_tokens_match_transformers(tmp_path, settings):
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    end = int(ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])[1, 9 + 2])  # row 1 ends early
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=end, **settings)
    expected, got = hf.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)


BARRING = [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1, repetition_penalty=1.3, min_new_tokens=3),
    dict(bad_words_ids=[[5], [7, 8]]),
    dict(suppress_tokens=[5, 6, 7]),
    dict(begin_suppress_tokens=[9, 10]),
]


@pytest.mark.parametrize("settings", BARRING)
def test_token_barring_keywords_match_transformers(tmp_path, settings):
    """no_repeat_ngram_size, bad_words_ids, suppress_tokens, begin_suppress_tokens: transformers' own
    processors, in its order with the repetition penalty and min_new_tokens, on left-padded prompts."""
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **settings)
    expected, got = hf.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_a_logits_processor_list_runs_as_in_transformers_and_min_p_warps_as_transformers(tmp_path):
    """Custom processors after the built-in ones (the n-gram barrier given as an object equals the keyword),
    and min_p after top_p: the same sequences and per-step scores as transformers'."""
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.2)
    expected = hf.generate(ids, no_repeat_ngram_size=2, **kwargs)
    got = ours.generate(ids, logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)]), **kwargs)
    assert torch.equal(got, expected)
    # min_p 0.999 keeps only the likeliest token: sampling is then deterministic on both sides
    sampled = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, min_p=0.999)
    sampled |= dict(return_dict_in_generate=True, output_scores=True)
    expected, got = hf.generate(ids, **sampled), ours.generate(ids, **sampled)
    assert torch.equal(got.sequences, expected.sequences)
    for mine, theirs in zip(got.scores, expected.scores, strict=True):
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
        torch.testing.assert_close(mine[~torch.isinf(mine)], theirs[~torch.isinf(theirs)], rtol=1e-5, atol=1e-5)


def test_unsupported_generate_keywords_and_bad_processor_values_are_named(tmp_path):
    _, ours = _dense_pair(tmp_path)
    ids = torch.randint(3, 100, (1, 5))
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['sequence_bias'\].*logits_processor=\[NoRepeatNGram"):
        ours.generate(ids, max_new_tokens=2, sequence_bias={(5,): -1.0})
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=-1 must be an integer >= 0"):
        ours.generate(ids, max_new_tokens=2, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"bad_words_ids. has to be a list of lists"):
        ours.generate(ids, max_new_tokens=2, bad_words_ids=[5])
    with pytest.raises(ValueError, match=r"min_p=2.0 must be in \[0, 1\]"):
        ours.generate(ids, max_new_tokens=2, do_sample=True, min_p=2.0)
    with pytest.raises(ValueError, match=r"logits_processor must be callables"):
        ours.generate(ids, max_new_tokens=2, logits_processor=[3])


def test_a_transformers_streamer_gets_what_transformers_gives_it(tmp_path):
    hf, ours = _dense_pair(tmp_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(160)}, unk_token="t0")))
    ids = torch.randint(3, 160, (1, 6))
    printed = {}
    for name, model in (("hf", hf), ("ours", ours)):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=False)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, streamer=streamer)
        printed[name] = ("".join(streamer), out)
    assert printed["ours"][0] == printed["hf"][0] and torch.equal(printed["ours"][1], printed["hf"][1])
    with pytest.raises(ValueError, match="a streamer takes one prompt row, got 2"):
        ours.generate(ids.repeat(2, 1), streamer=TextIteratorStreamer(tokenizer))


@pytest.mark.parametrize("sampling", [dict(do_sample=False, repetition_penalty=1.3), dict(do_sample=True, top_k=1, temperature=0.7)])
def test_return_dict_with_scores_and_logits_matches_transformers(tmp_path, sampling):
    hf, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(hf.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected, got = hf.generate(ids, **kwargs, **sampling), ours.generate(ids, **kwargs, **sampling)
    assert torch.equal(got.sequences, expected.sequences) and len(got.scores) == len(expected.scores) == 6
    for name in ("scores", "logits"):
        for mine, theirs in zip(getattr(got, name), getattr(expected, name)):
            finite = torch.isfinite(theirs)
            assert torch.equal(torch.isfinite(mine), finite), name
            torch.testing.assert_close(mine[finite], theirs[finite].float(), rtol=1e-4, atol=1e-4, msg=name)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, **sampling)
    assert torch.equal(plain.sequences, got.sequences) and plain.scores is None and plain.logits is None


def test_num_return_sequences_and_beams():
    model = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config(**VARIED))
    ids = torch.randint(3, 160, (2, 5))
    out = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=0, eos_token_id=[])
    assert out.shape == (6, 9) and torch.equal(out[:, :5], ids.repeat_interleave(3, dim=0))
    with pytest.raises(ValueError, match="num_return_sequences=3 needs do_sample=True"):
        model.generate(ids, num_return_sequences=3, do_sample=False)
    with pytest.raises(ValueError, match="num_beams=4: beam search is not supported"):
        model.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match="repetition_penalty=0 must be a number > 0"):
        model.generate(ids, repetition_penalty=0)


def test_a_stopping_criterion_without_end_tokens_lets_rows_go_on_until_all_are_done(tmp_path):
    """With end tokens off nothing is padded: a row a criterion ended keeps producing tokens (as in
    transformers), and the call ends at the step where the last row is done."""
    _, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(ours.config.vocab_size)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    budget = torch.tensor([2, 5, 3])  # new tokens after which each row is done

    def enough(input_ids, scores):
        return input_ids.shape[1] - 9 >= budget  # [B]

    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], stopping_criteria=enough)
    assert torch.equal(got, plain[:, : 9 + 5])


def assert_cached_steps_match_uncached(ours) -> None:
    """Every token generated with the KV cache is the argmax of a full forward over the sequence so far."""
    ids, mask = _left_padded_prompts(ours.config.vocab_size)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert out.shape == (3, 9 + NEW_TOKENS)
    full_mask = torch.cat([mask, torch.ones(3, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            end = 9 + step
            logits = ours(out[:, :end], attention_mask=full_mask[:, :end], position_ids=positions_from_mask(full_mask[:, :end])).logits
            assert torch.equal(logits[:, -1].argmax(-1), out[:, end]), f"step {step}"


def test_each_cached_step_equals_argmax_of_uncached_forward(tmp_path):
    assert_cached_steps_match_uncached(_dense_pair(tmp_path)[1])


def test_unpadded_prompt_needs_no_mask(tmp_path):
    hf, ours = _dense_pair(tmp_path)
    ids = torch.randint(3, hf.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=NEW_TOKENS), expected)
    assert torch.equal(ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS), expected)


def test_kv_cache_appends_in_place():
    cache = KVCache(capacity=5)
    k1, v1 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    k2, v2 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    cache.update(k1, v1)
    keys, values = cache.update(k2, v2)
    assert cache.length == 5
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, torch.cat([v1, v2], dim=2))
    assert keys.data_ptr() == cache.keys.data_ptr()  # a view of the preallocated buffer
    with pytest.raises(RuntimeError, match="capacity is 5"):
        cache.update(k2, v2)


# ----- sampling -------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(tmp_path):
    _, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(ours.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    first = ours.generate(ids, seed=7, **kwargs)
    assert torch.equal(ours.generate(ids, seed=7, **kwargs), first)
    assert torch.equal(ours.generate(ids, generator=torch.Generator().manual_seed(7), **kwargs), first)
    assert not torch.equal(ours.generate(ids, seed=8, **kwargs), first)
    assert not torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]), first)


@pytest.mark.parametrize("restriction", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.9)])
def test_sampling_restricted_to_the_top_token_is_greedy(tmp_path, restriction):
    _, ours = _dense_pair(tmp_path)
    ids, mask = _left_padded_prompts(ours.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    sampled = ours.generate(ids, do_sample=True, temperature=2.0, seed=0, **restriction, **kwargs)
    assert torch.equal(sampled, ours.generate(ids, **kwargs))


def _draw_support(logits: torch.Tensor, sampling: Sampling, draws: int = 4000) -> set[int]:
    choose = token_chooser(sampling, torch.Generator().manual_seed(0))
    return set(choose(logits.expand(draws, -1).clone()).tolist())


def test_top_k_keeps_the_k_most_likely_tokens():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    filtered = filter_top_k(logits, 2)
    assert torch.isfinite(filtered).nonzero()[:, 1].tolist() == [1, 3]
    assert _draw_support(logits, Sampling(do_sample=True, top_k=3)) == {1, 3, 4}


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, kept):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert set(torch.isfinite(filter_top_p(logits, top_p)).nonzero()[:, 1].tolist()) == kept
    assert _draw_support(logits, Sampling(do_sample=True, top_p=top_p)) == kept


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.3), (None, 0.9), (20, 0.7)])
def test_filters_keep_the_same_tokens_as_transformers_warpers(top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = logits
    theirs = logits.clone()
    if top_k is not None:
        ours, theirs = filter_top_k(ours, top_k), TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        ours, theirs = filter_top_p(ours, top_p), TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


@pytest.mark.parametrize(
    "tail",
    [dict(min_p=0.05), dict(typical_p=0.6), dict(epsilon_cutoff=3e-3), dict(eta_cutoff=1e-2),
     dict(min_p=0.02, typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=3e-3)],
)  # fmt: skip
def test_sampling_warpers_after_top_p_are_transformers_chain(tail):
    """Temperature, top-k, top-p, then min-p, typical-p, epsilon and eta cutoffs: the scores of
    transformers' own warper list in its order (generate builds the same list when sampling)."""
    from transformers.generation import logits_process as lp

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    ours = sampling_logits(logits, Sampling(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, **tail))
    chain = [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(40), lp.TopPLogitsWarper(0.95)]
    chain += [warper for name, warper in (
        ("min_p", lambda v: lp.MinPLogitsWarper(v)), ("typical_p", lambda v: lp.TypicalLogitsWarper(v)),
        ("epsilon_cutoff", lambda v: lp.EpsilonLogitsWarper(v)), ("eta_cutoff", lambda v: lp.EtaLogitsWarper(v)),
    ) for warper in ([warper(tail[name])] if name in tail else [])]  # fmt: skip
    theirs = lp.LogitsProcessorList(chain)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"typical_p. has to be a float > 0 and < 1"):
        Sampling(do_sample=True, typical_p=-0.5)


def test_top_k_then_top_p_renormalises_in_between():
    # top_k=2 leaves {0: 0.625, 1: 0.375}; top_p=0.6 then keeps token 0 alone.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _draw_support(logits, Sampling(do_sample=True, top_k=2, top_p=0.6)) == {0}


# ----- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature=0.0 must be a number > 0"),
        (dict(do_sample=True, top_k=0), "top_k=0 must be an integer >= 1"),
        (dict(do_sample=True, top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (dict(max_new_tokens=None, max_length=3), r"max_length=3 \(prompt \+ new tokens\) leaves no room after the prompt's 3"),
        (dict(stopping_criteria=[5]), "stopping_criteria must be callables"),
        (dict(eos_token_id=10_000), r"eos_token_id=\[10000\] is out of range for vocab_size=160"),
        (dict(seed=1, generator=torch.Generator()), "either generator or seed"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids is empty"),
        (dict(input_ids=torch.tensor([[5, 200]])), "token id 200 is out of range for vocab_size=160"),
        (dict(input_ids=torch.tensor([5, 6])), r"must be an integer tensor \[batch, seq\]"),
        (dict(input_ids=[[5, 6]]), r"must be an integer tensor \[batch, seq\], got a list; e.g. torch.tensor"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), r"row\(s\) \[0\] end in padding: pad prompts on the left"),
        (dict(input_ids=torch.tensor([[5, 6, 0]])), r"row\(s\) \[0\] end in padding"),  # mask inferred from pad id 0
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), r"row\(s\) \[0\] have no real token"),
        (dict(attention_mask=torch.tensor([[1, 1]])), r"attention_mask shape \[1, 2\] must equal input_ids shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, message):
    model = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config())
    kwargs = dict(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3) | change
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)
