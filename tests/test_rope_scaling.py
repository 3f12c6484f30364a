"""Scaled RoPE (context extension) vs transformers in float32: every scaled ``rope_type`` transformers
5.24 knows, the length-dependent ones (``dynamic``, ``longrope``) over calls of changing length and in
generation, fp32 frequencies after casts, the legacy ``rope_scaling`` key, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Ernie4_5Config
from transformers import Ernie4_5ForCausalLM as HFErnie

import ernie45
from ernie45.distributed import LayoutError, apply_context_parallel
from ernie45.models.validation import check_model_config

from builders import random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config

TRAINED = 32  # max_position_embeddings of the test models: the inputs below run past it
HALF_HEAD = 8  # the tiny dense model's head_dim / 2 (one longrope factor per rotated pair)
ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=TRAINED // 4),
    "longrope": dict(
        rope_type="longrope",
        short_factor=[1.0 + i / 10 for i in range(HALF_HEAD)],
        long_factor=[2.0 + i for i in range(HALF_HEAD)],
        original_max_position_embeddings=TRAINED // 2,
    ),
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8
    ),
    "proportional": dict(rope_type="proportional"),
}


def _config(name: str, **overrides) -> Ernie4_5Config:
    rope = {"rope_theta": 10000.0, **ROPES[name]}
    return tiny_dense_config(rope_parameters=rope, max_position_embeddings=TRAINED, **overrides)


def _pair(tmp_path, config, hf_builder=lambda config: random_hf_model(HFErnie, config)):
    hf = hf_builder(config)
    hf.save_pretrained(tmp_path)
    return hf, ernie45.from_pretrained(tmp_path)


def _ids(vocab_size: int, length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))


def test_every_scaled_rope_type_transformers_knows_is_covered_here():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPES) == set(ROPE_INIT_FUNCTIONS)


@pytest.mark.parametrize("name", list(ROPES))
def test_logits_and_grads_match_transformers(tmp_path, name):
    hf, ours = _pair(tmp_path, _config(name))
    assert ours.model.rotary_emb.attention_scaling == hf.model.rotary_emb.attention_scaling
    ids = _ids(hf.config.vocab_size, 2 * TRAINED)
    hf_out, our_out = hf(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(our_out.logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for param_name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[param_name], rtol=1e-4, atol=1e-6, msg=param_name)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_frequencies_follow_each_call_as_in_transformers(tmp_path, name):
    """dynamic stretches its frequencies as calls grow past the trained length and goes back to plain
    ones below it; longrope switches between its short and long factors: the same calls, the same logits."""
    hf, ours = _pair(tmp_path, _config(name))
    with torch.no_grad():
        for length in (20, 48, 70, 40, 56, 12, 33):
            ids = _ids(hf.config.vocab_size, length, batch=1)
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5, msg=f"{length} tokens")
            if name == "dynamic":  # the frequencies kept for the next call (longrope picks them per call)
                assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq), f"{length} tokens"


@pytest.mark.parametrize("name", ["dynamic", "longrope", "yarn"])
def test_greedy_generation_past_the_trained_length_matches_transformers(tmp_path, name):
    hf, ours = _pair(tmp_path, _config(name))
    prompt = _ids(hf.config.vocab_size, TRAINED - 8)
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, **kwargs), hf.generate(prompt, **kwargs))


@pytest.mark.parametrize("name", ["yarn", "dynamic"])
def test_moe_model_matches_transformers(tmp_path, name):
    config = tiny_moe_config(rope_parameters={"rope_theta": 10000.0, **ROPES[name]}, max_position_embeddings=TRAINED)
    hf, ours = _pair(tmp_path, config, random_hf_moe)
    with torch.no_grad():
        for length in (20, 48):
            ids = _ids(hf.config.vocab_size, length)
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dynamic", "longrope", "yarn"])
def test_casts_and_meta_builds_keep_the_frequencies_fp32_and_exact(tmp_path, name):
    config = _config(name)
    reference = HFErnie(config).model.rotary_emb
    model = ernie45.Ernie4_5ForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.float().to(torch.bfloat16)
    with torch.device("meta"):
        meta_built = ernie45.Ernie4_5ForCausalLM.from_config(config)
    meta_built.to_empty(device="cpu")
    meta_built.materialize_buffers()
    for rotary in (model.model.rotary_emb, meta_built.model.rotary_emb):
        for buffer in ("inv_freq", "original_inv_freq", "long_inv_freq"):
            if hasattr(reference, buffer) and hasattr(rotary, buffer):
                assert getattr(rotary, buffer).dtype == torch.float32
                assert torch.equal(getattr(rotary, buffer), getattr(reference, buffer).float()), buffer
        assert rotary.attention_scaling == reference.attention_scaling
    logits = model(_ids(config.vocab_size, 2 * TRAINED)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_legacy_rope_scaling_key_loads_as_in_transformers(tmp_path):
    hf = random_hf_model(HFErnie, tiny_dense_config(max_position_embeddings=TRAINED))
    hf.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"type": "linear", "factor": 4.0}
    config_file.write_text(json.dumps(config))
    hf, ours = HFErnie.from_pretrained(tmp_path), ernie45.from_pretrained(tmp_path)
    assert ours.model.rotary_emb.rope_type == "linear"
    ids = _ids(hf.config.vocab_size, 2 * TRAINED)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_keywords_override_the_config_as_in_transformers(tmp_path):
    """Context extension of a plain checkpoint: ``rope_parameters=`` and ``max_position_embeddings=``."""
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    random_hf_model(HFErnie, tiny_dense_config(max_position_embeddings=TRAINED, rope_parameters=plain)).save_pretrained(tmp_path)
    extended = dict(rope_parameters={"rope_theta": 10000.0, **ROPES["yarn"]}, max_position_embeddings=4 * TRAINED)
    hf, ours = HFErnie.from_pretrained(tmp_path, **extended), ernie45.from_pretrained(tmp_path, **extended)
    assert ours.config.max_position_embeddings == 4 * TRAINED and ours.model.rotary_emb.rope_type == "yarn"
    ids = _ids(hf.config.vocab_size, 3 * TRAINED)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    # transformers 4's rope_scaling keyword: the scaling on the checkpoint's own base (10000 here)
    legacy = ernie45.from_pretrained(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    linear = HFErnie.from_pretrained(tmp_path, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with torch.no_grad():
        torch.testing.assert_close(legacy(ids).logits, linear(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"rope_scaling and rope_parameters are both given"):
        ernie45.from_pretrained(tmp_path, rope_scaling={"type": "linear", "factor": 2.0}, **extended)
    with pytest.raises(ValueError, match=r"from_pretrained\(rope_parameters=.*'rope_type'='linear': \{'factor'\}"):
        ernie45.from_pretrained(tmp_path, rope_parameters={"rope_type": "linear", "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"^num_hidden_layers=0 must be an integer >= 1"):
        ernie45.from_pretrained(tmp_path, num_hidden_layers=0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['rope_scale'\].*and the config's fields"):
        ernie45.from_pretrained(tmp_path, rope_scale=2.0)


def test_unknown_or_impossible_rope_parameters_are_clear_errors():
    unknown = tiny_dense_config(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"rope_type='ntk-by-parts' is not a RoPE type transformers knows; use one of default, linear"):
        ernie45.Ernie4_5ForCausalLM.from_config(unknown)
    with pytest.raises(ValueError, match=r"rope_type='ntk-by-parts'"):
        check_model_config({"rope_parameters": {"rope_type": "ntk-by-parts"}})
    with pytest.raises(ValueError, match=r"rope_parameters='yarn' must be a mapping"):
        check_model_config({"rope_parameters": "yarn"})
    partial = tiny_dense_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5: ERNIE 4.5 rotates every dimension"):
        ernie45.Ernie4_5ForCausalLM.from_config(partial)
    short = dict(ROPES["longrope"], short_factor=[1.0] * 3, rope_theta=1e4)  # 3 factors for 8 rotated pairs
    with pytest.raises(ValueError, match=r"cannot give 'longrope' RoPE frequencies for head_dim=16"):
        ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config(rope_parameters=short, max_position_embeddings=TRAINED))


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_context_parallel_refuses_length_dependent_rope(name):
    """Each cp rank sees other positions, so the longest one (which picks the frequencies) would differ."""
    model = ernie45.Ernie4_5ForCausalLM.from_config(_config(name))
    with pytest.raises(LayoutError, match=rf"rope_type='{name}' picks its frequencies .* use cp_size=1"):
        apply_context_parallel(model, cp_group=None)
