"""Dense ERNIE 4.5 vs transformers in float32: logits, gradients, padding, outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Ernie4_5ForCausalLM as HFErnie

import ernie45
from ernie45 import BackendConfig
from ernie45.models.attention import ATTENTION_KERNELS, build_attention_mask

from builders import random_hf_model, tiny_dense_config

CONFIGS = {
    "gqa": {},
    "mqa": dict(num_key_value_heads=1),
    "mha": dict(num_key_value_heads=4),
    "head_dim_differs": dict(head_dim=24),  # 4 x 24 = 96 != hidden 64
    "bias_untied": dict(use_bias=True, tie_word_embeddings=False),
    "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def _load_pair(tmp_path, overrides, backend=None):
    hf = random_hf_model(HFErnie, tiny_dense_config(**overrides))
    hf.save_pretrained(tmp_path)
    return hf, ernie45.from_pretrained(tmp_path, backend=backend)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_grads_match_transformers(tmp_path, name):
    hf, ours = _load_pair(tmp_path, CONFIGS[name])
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    hf_out = hf(ids, labels=labels)
    our_out = ours(ids, labels=labels)
    torch.testing.assert_close(our_out.logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_out.loss, hf_out.loss, rtol=1e-5, atol=1e-6)
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(hf_grads)
    for param_name, param in our_params.items():
        torch.testing.assert_close(param.grad, hf_grads[param_name], rtol=1e-4, atol=1e-6, msg=param_name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_with_attention_mask_and_positions(tmp_path, attn):
    """Every position equals transformers' (sdpa, its default), padding included: a query of leading
    padding sees no key and gets a zero attention output, one of trailing padding sees the real
    tokens before it (only the keys decide, as transformers' mask)."""
    hf, ours = _load_pair(tmp_path, {}, BackendConfig(attn=attn))
    ids = torch.randint(3, hf.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0  # a row with a single real token
    mask[3, 6:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    positions[3] = torch.arange(10)  # NOTE: positions that restart or repeat would mark packed documents
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        got = ours(ids, attention_mask=mask, position_ids=positions, labels=labels)
        got_from_padding_mask = ours(ids, padding_mask=mask == 0, position_ids=positions).logits
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    # NOTE: the first real token of a left-padded row is predicted from a padding position
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_from_padding_mask, got.logits)


def test_a_query_that_sees_no_key_gets_zeros_and_finite_gradients_in_every_kernel():
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = build_attention_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool(), 5)
    outputs = {name: ATTENTION_KERNELS[name](q, k, v, mask, 8**-0.5) for name in ("sdpa", "eager")}
    for name, out in outputs.items():
        assert torch.equal(out[0, :, :2], torch.zeros(2, 2, 8)), name
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), name
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"])
    with torch.no_grad():  # NOTE: flex has no backward on CPU
        flex = ATTENTION_KERNELS["flex"](q.detach(), k.detach(), v.detach(), mask, 8**-0.5)
    torch.testing.assert_close(flex, outputs["sdpa"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_one_low_precision_query_over_a_cache_is_the_fp32_kernel_rounded_and_no_less_accurate(dtype, masked):
    """Decoding on a CPU: one reduced-precision query per sequence runs torch's kernel in fp32 (much
    faster there) and is rounded once; its error against fp64 is at most that of the kernel in dtype."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 32, generator=generator)  # 8 query heads over 2 key/value heads
    k, v = (torch.randn(3, 2, 200, 32, generator=generator) for _ in range(2))
    mask = None
    if masked:  # left padding: the first rows' keys start late
        mask = build_attention_mask(torch.arange(200).expand(3, 200) >= torch.tensor([[0], [37], [150]]), 1)
    low = [t.to(dtype) for t in (q, k, v)]
    ours = ATTENTION_KERNELS["sdpa"](*low, mask, 32**-0.5)
    assert ours.dtype == dtype
    as_fp32 = F.scaled_dot_product_attention(*(t.float() for t in low), attn_mask=mask, scale=32**-0.5, enable_gqa=True)
    assert torch.equal(ours, as_fp32.to(dtype))
    exact = F.scaled_dot_product_attention(*(t.double() for t in low), attn_mask=mask, scale=32**-0.5, enable_gqa=True)
    in_dtype = F.scaled_dot_product_attention(*low, attn_mask=mask, scale=32**-0.5, enable_gqa=True)
    assert (ours.double() - exact).abs().mean() <= (in_dtype.double() - exact).abs().mean()


def test_flex_attention_forward_matches(tmp_path):
    hf, ours = _load_pair(tmp_path, {}, BackendConfig(attn="flex"))
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got, expected = ours(ids, **kwargs).logits, hf(ids, **kwargs).logits
            real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
            torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_flex_attention_refuses_backward_on_cpu(tmp_path):
    _, ours = _load_pair(tmp_path, {}, BackendConfig(attn="flex"))
    with pytest.raises(RuntimeError, match="no backward pass on CPU.*attn='sdpa'"):
        ours(torch.zeros(1, 4, dtype=torch.long))


def test_fused_rms_norm_backend_matches(tmp_path):
    hf, ours = _load_pair(tmp_path, {}, BackendConfig(rms_norm="torch"))
    ids = torch.randint(0, hf.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_logits_to_keep_and_hidden_states(tmp_path):
    hf, ours = _load_pair(tmp_path, {})
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        torch.testing.assert_close(ours(ids, logits_to_keep=3).logits, full[:, -3:])
        index = torch.tensor([0, 4, 9])
        torch.testing.assert_close(ours(ids, logits_to_keep=index).logits, full[:, index])
        torch.testing.assert_close(hf(ids, logits_to_keep=index).logits, full[:, index], rtol=1e-5, atol=1e-5)
        tokens = torch.zeros(2, 10, dtype=torch.bool)
        tokens[0, 7:], tokens[1, [2, 9]] = True, True  # scoring: each row's own tokens, flattened
        torch.testing.assert_close(ours(ids, logits_to_keep=tokens).logits, full[tokens])
        assert ours(ids, logits_to_keep=tokens).logits.shape == (5, hf.config.vocab_size)
        with pytest.raises(ValueError, match=r"boolean logits_to_keep marks tokens of input_ids \[2, 10\], got shape \[10\]"):
            ours(ids, logits_to_keep=tokens[0])
        ours_hidden = ours(ids, output_hidden_states=True).hidden_states
        hf_hidden = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours_hidden) == len(hf_hidden) == hf.config.num_hidden_layers + 1
    for got, expected in zip(ours_hidden, hf_hidden):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ours(ids).hidden_states is None


def test_no_kept_logits_skip_the_head_product(tmp_path):
    """A fused loss asks for no logits: the head must not run (under autocast its empty product
    would still cast the whole [V,H] weight), yet the empty logits look like the product's."""
    hf, ours = _load_pair(tmp_path, {})
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    calls = []
    ours.lm_head.register_forward_hook(lambda *_: calls.append(1))
    none = torch.empty(0, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        empty = ours(ids, logits_to_keep=none, output_hidden_states=True)
    assert empty.logits.shape == (2, 0, hf.config.vocab_size) and empty.logits.dtype == torch.bfloat16
    assert ours(ids, logits_to_keep=none).logits.dtype == torch.float32
    assert calls == []
    ours(ids, logits_to_keep=1)
    assert calls == [1]
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True).hidden_states[-1]
    hidden = ours(ids, logits_to_keep=none, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_token_id_out_of_range_is_a_clear_error(tmp_path):
    hf, ours = _load_pair(tmp_path, {})
    vocab = hf.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is out of range for vocab_size={vocab}"):
        ours(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        ours(torch.tensor([[-1, 2]]))


def test_labels_out_of_range_or_misshaped_are_clear_errors(tmp_path):
    hf, ours = _load_pair(tmp_path, {})
    vocab = hf.config.vocab_size
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=f"label {vocab} is out of range for vocab_size={vocab}.*-100 to ignore"):
        ours(ids, labels=torch.tensor([[1, vocab, 3]]))
    with pytest.raises(ValueError, match="label -5 is out of range"):
        ours(ids, labels=torch.tensor([[1, -5, 3]]))
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \[1, 3\]"):
        ours(ids, labels=torch.tensor([[1, 2]]))
    ignored_first = torch.tensor([[-100, -100, 3]])  # -100 anywhere is fine, as in transformers
    torch.testing.assert_close(ours(ids, labels=ignored_first).loss, hf(ids, labels=ignored_first).loss)


def test_dtype_may_be_a_name_and_must_be_floating_point(tmp_path):
    _load_pair(tmp_path, {})
    assert ernie45.from_pretrained(tmp_path, dtype="bfloat16").dtype == torch.bfloat16  # transformers' spelling
    assert ernie45.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32  # the checkpoint's
    for bad in ("int8", torch.int64, "bf16"):
        with pytest.raises(ValueError, match=f"dtype={bad!r} is not a floating-point dtype"):
            ernie45.from_pretrained(tmp_path, dtype=bad)


def test_wrong_input_shapes_are_clear_errors(tmp_path):
    _, ours = _load_pair(tmp_path, {})
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\], got shape \[2\]; .* use ids\[None\]"):
        ours(torch.tensor([1, 2]))
    # An all-ones mask of the wrong length used to pass silently (no padding means no mask is built).
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, 3\], expected .* = \[1, 2\]"):
        ours(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_embedding_accessors_and_tying():
    config = tiny_dense_config(tie_word_embeddings=False)
    model = ernie45.Ernie4_5ForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    tied = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    new_embedding = torch.nn.Embedding(tied.config.vocab_size, tied.config.hidden_size)
    tied.set_input_embeddings(new_embedding)
    assert tied.get_output_embeddings().weight is new_embedding.weight


def test_from_config_bf16_keeps_rope_frequencies_fp32():
    model = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config(), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    model.float().to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    logits = model(torch.randint(0, 100, (1, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_backend_config_rejects_unavailable_values():
    with pytest.raises(ValueError, match=r"BackendConfig.attn='te' is not available.*'sdpa', 'eager', 'flex'"):
        BackendConfig(attn="te")
    with pytest.raises(ValueError, match=r"BackendConfig.experts='gmm'.*'torch', 'torch_mm'"):
        BackendConfig(experts="gmm")
    with pytest.raises(ValueError, match="unknown value"):
        BackendConfig(rms_norm="layernorm")
    with pytest.raises(ValueError, match="unknown backend key"):
        BackendConfig.from_dict({"atn": "sdpa"})
    assert BackendConfig(gate_precision="float32").gate_precision is torch.float32
