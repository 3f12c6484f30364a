"""transformers' model-test expectations, run on our classes (dense and MoE, fp32, random weights).

What transformers' own ERNIE 4.5 model tests check and what applies here: output classes, hidden
states, inputs_embeds, batching and left-padding equivalence, the loss with ``shift_labels``,
determinism, incremental decoding with the cache, router logits and the load-balancing loss,
and that nothing is silently ignored (unknown keywords, 1-D position ids). Plus the AutoModel
names users port from: MoEConfig's fields, the state-dict adapters, ``torch_dtype``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import Ernie4_5ForCausalLM as HFDense
from transformers import Ernie4_5Model as HFDenseModel
from transformers import Ernie4_5_MoeModel as HFMoeModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)

import ernie45
from ernie45 import BackendConfig, Ernie4_5_MoeForCausalLM, Ernie4_5_MoeModel, Ernie4_5ForCausalLM, Ernie4_5Model
from ernie45 import MoEConfig
from ernie45.checkpoint.safetensors_io import CheckpointError
from ernie45.checkpoint.state_dict_adapter import Ernie4_5_MoeStateDictAdapter, Ernie4_5StateDictAdapter

from builders import moe_model, random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config

KINDS = ["dense", "moe"]


def pair(kind: str, tmp_path, **overrides):
    """(transformers model, ours loaded from its save), same random weights."""
    if kind == "dense":
        hf = random_hf_model(HFDense, tiny_dense_config(**overrides))
    else:
        hf = random_hf_moe(tiny_moe_config(**overrides))
    hf.save_pretrained(tmp_path)
    return hf.eval(), ernie45.from_pretrained(tmp_path)


def ids_for(model, batch: int = 2, seq: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----- outputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_output_classes_and_hidden_states_match_transformers(kind, tmp_path):
    hf, ours = pair(kind, tmp_path)
    ids = ids_for(ours)
    expected = hf(ids, output_hidden_states=True)
    got = ours(ids, output_hidden_states=True)
    assert isinstance(got, MoeCausalLMOutputWithPast if kind == "moe" else CausalLMOutputWithPast)
    assert len(got.hidden_states) == len(expected.hidden_states) == ours.config.num_hidden_layers + 1
    for ours_h, hf_h in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours_h, hf_h, rtol=1e-5, atol=1e-5)
    as_tuple = ours(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], got.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_base_model_returns_transformers_output(kind, tmp_path):
    hf, ours = pair(kind, tmp_path)
    ids = ids_for(ours)
    hf_body = (HFMoeModel if kind == "moe" else HFDenseModel).from_pretrained(tmp_path).eval()
    expected = hf_body(ids, output_router_logits=True) if kind == "moe" else hf_body(ids)
    got = ours.model(ids, output_router_logits=True) if kind == "moe" else ours.model(ids)
    assert isinstance(got, MoeModelOutputWithPast if kind == "moe" else BaseModelOutputWithPast)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    if kind == "moe":
        assert len(got.router_logits) == len(expected.router_logits) == 2
        for ours_r, hf_r in zip(got.router_logits, expected.router_logits):
            torch.testing.assert_close(ours_r, hf_r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_embeds_equal_input_ids(kind, tmp_path):
    hf, ours = pair(kind, tmp_path)
    ids = ids_for(ours)
    embeds = ours.get_input_embeddings()(ids)
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, ours(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=embeds)


# ----- equivalences ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_batching_equivalence_and_determinism(kind, tmp_path):
    _, ours = pair(kind, tmp_path)
    ids = ids_for(ours, batch=3)
    batched = ours(ids).logits
    for row in range(3):
        torch.testing.assert_close(ours(ids[row : row + 1]).logits[0], batched[row], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours(ids).logits, batched)  # same input, same output, bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_equivalence(kind, tmp_path):
    hf, ours = pair(kind, tmp_path)
    ids = ids_for(ours, batch=1, seq=6)
    pad = torch.full((1, 3), ours.config.pad_token_id or 0)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = ours(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(got, ours(ids).logits, rtol=1e-5, atol=1e-5)
    expected = hf(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_with_the_cache_equals_one_forward(kind, tmp_path):
    _, ours = pair(kind, tmp_path)
    ids = ids_for(ours, seq=9)
    full = ours(ids).logits
    first = ours(ids[:, :5], use_cache=True)
    cache = first.cache
    assert len(cache) == ours.config.num_hidden_layers and cache[0].length == 5
    steps = [first.logits]
    for t in range(5, 9):
        out = ours(ids[:, t : t + 1], past_key_values=cache)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    legacy = ours(ids[:, :5], use_cache=True).cache
    torch.testing.assert_close(ours(ids[:, 5:6], past_key_values=legacy).logits, steps[1])  # the older name
    with pytest.raises(TypeError, match="cache must be the list"):
        ours(ids, cache=("not", "a", "cache"))


def test_cache_position_gives_the_positions(tmp_path):
    _, ours = pair("dense", tmp_path)
    ids = ids_for(ours)
    shifted = torch.arange(4, 4 + ids.shape[1])
    torch.testing.assert_close(
        ours(ids, cache_position=shifted).logits, ours(ids, position_ids=shifted[None].expand(2, -1)).logits
    )


# ----- losses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_with_labels_and_with_shift_labels(kind, tmp_path):
    hf, ours = pair(kind, tmp_path)
    ids = ids_for(ours)
    labels = ids.clone()
    labels[0, :3] = -100
    torch.testing.assert_close(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    shift = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = hf(ids, labels=labels, shift_labels=shift).loss
    torch.testing.assert_close(ours(ids, labels=labels, shift_labels=shift).loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(ids, shift_labels=shift).loss, expected, rtol=1e-5, atol=1e-6)
    # a different shift_labels must change the loss (it is used, not ignored)
    other = shift.roll(1, dims=1)
    assert not torch.allclose(ours(ids, labels=labels, shift_labels=other).loss, expected)


def test_router_logits_and_load_balancing_loss_match_transformers(tmp_path):
    hf, ours = pair("moe", tmp_path)
    ids = ids_for(ours)
    expected = hf(ids, output_router_logits=True)
    got = ours(ids, output_router_logits=True)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    for ours_r, hf_r in zip(got.router_logits, expected.router_logits):
        torch.testing.assert_close(ours_r, hf_r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("from_config", [True, False])
def test_training_loss_with_router_logits_weighs_in_the_aux_loss_as_transformers(from_config, tmp_path):
    """transformers adds router_aux_loss_coef * aux_loss to a labelled call's loss when
    output_router_logits is on (the config's or the call's): the loss and every gradient match."""
    hf, ours = pair("moe", tmp_path, output_router_logits=from_config, router_aux_loss_coef=0.05)
    hf.train(), ours.train()
    ids = ids_for(ours, seq=9)
    asked = {} if from_config else {"output_router_logits": True}
    expected, got = hf(ids, labels=ids, **asked), ours(ids, labels=ids, **asked)
    assert expected.aux_loss > 0.5  # so that the weighted term shows in the loss
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    plain = ours(ids, labels=ids, output_router_logits=False).loss
    torch.testing.assert_close(got.loss - plain, 0.05 * got.aux_loss, rtol=1e-4, atol=1e-7)
    expected.loss.backward(), got.loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    for name, param in ours.named_parameters():
        if name in hf_grads and hf_grads[name].shape == param.shape:
            torch.testing.assert_close(param.grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_base_model_router_logits_follow_the_config_as_transformers(tmp_path):
    hf, ours = pair("moe", tmp_path, output_router_logits=True)
    ids = ids_for(ours)
    expected = HFMoeModel.from_pretrained(tmp_path).eval()(ids).router_logits
    got = ours.model(ids).router_logits  # not asked for in the call: the config says so
    assert got is not None and len(got) == len(expected) == 2
    for ours_r, hf_r in zip(got, expected):
        torch.testing.assert_close(ours_r, hf_r.float(), rtol=1e-5, atol=1e-5)
    assert ours.model(ids, output_router_logits=False).router_logits is None


def test_load_balancing_loss_ignores_left_padding_as_transformers(tmp_path):
    """transformers' own load-balancing test: left padding with its attention mask leaves aux_loss
    as it was without padding; the same padding unmasked changes it."""
    hf, ours = pair("moe", tmp_path)
    ids = ids_for(ours, seq=7)
    padded = torch.cat([torch.ones(2, 28, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 28, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        for model in (hf, ours):
            alone = model(ids, output_router_logits=True).aux_loss
            masked = model(padded, attention_mask=mask, output_router_logits=True).aux_loss
            torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-4)
            assert abs(float(model(padded, output_router_logits=True).aux_loss) - float(alone)) > 1e-3
        expected = hf(padded, attention_mask=mask, output_router_logits=True).aux_loss
        got = ours(padded, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----- nothing silently ignored ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_unknown_keywords_are_errors(kind, tmp_path):
    _, ours = pair(kind, tmp_path)
    ids = ids_for(ours)
    with pytest.raises(TypeError, match="totally_bogus_kwarg"):
        ours(ids, totally_bogus_kwarg=1)
    with pytest.raises(TypeError):
        ours(ids, None, None)  # positional arguments after input_ids would mean transformers' order
    with pytest.raises(ValueError, match="output_attentions"):
        ours(ids, output_attentions=True)


def test_one_dimensional_position_ids_are_one_row_for_every_sequence(tmp_path):
    # MHA with as many heads as tokens: a [S] position tensor broadcast over heads would be silently wrong
    _, ours = pair("dense", tmp_path, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    ids = ids_for(ours, seq=4)
    positions = torch.arange(4)
    torch.testing.assert_close(ours(ids, position_ids=positions).logits, ours(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="position_ids has shape"):
        ours(ids, position_ids=torch.arange(5))


# ----- construction --------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: Ernie4_5_MoeModel(tiny_moe_config()),
    lambda: Ernie4_5_MoeForCausalLM(tiny_moe_config()),
    lambda: Ernie4_5Model(tiny_dense_config()),
    lambda: Ernie4_5ForCausalLM(tiny_dense_config()),
])  # fmt: skip
def test_every_constructor_initialises_its_weights(build):
    torch.manual_seed(0)
    model = build()
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    ids = torch.randint(3, 160, (1, 5))
    out = model(ids)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    assert torch.isfinite(hidden).all()


def test_from_config_takes_transformers_attn_implementation_and_names_unknown_keywords():
    assert ernie45.from_config(tiny_dense_config(), attn_implementation="eager").backend.attn == "eager"
    with pytest.raises(TypeError, match=r"from_config\(\) got unexpected keyword argument\(s\) \['moe_k'\]; Ernie4_5ForCausalLM takes"):
        ernie45.from_config(tiny_dense_config(), moe_k=2)


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = Ernie4_5_MoeForCausalLM(tiny_moe_config())
    assert all(p.is_meta for p in model.parameters())


def test_torch_dtype_is_an_alias_of_dtype_and_vocab_size_exists(tmp_path):
    _, ours = pair("dense", tmp_path)
    loaded = ernie45.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.vocab_size == ours.config.vocab_size
    built = Ernie4_5ForCausalLM.from_config(tiny_dense_config(), torch_dtype="bfloat16")
    assert built.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        ernie45.from_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_config_keywords_of_from_pretrained_override_config_json_as_in_transformers(kind, tmp_path):
    """``num_hidden_layers=`` loads the first layers (the rest of the file is left unread), other
    fields are set on the config; more layers than the file holds is an error naming the missing ones."""
    hf_class = type(pair(kind, tmp_path, num_hidden_layers=3)[0])
    hf, ours = hf_class.from_pretrained(tmp_path, num_hidden_layers=2), ernie45.from_pretrained(tmp_path, num_hidden_layers=2, use_cache=False)
    assert len(ours.model.layers) == 2 and ours.config.use_cache is False
    ids = ids_for(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) missing from the checkpoint .*model\.layers\.3\."):
        ernie45.from_pretrained(tmp_path, num_hidden_layers=4)
    # a forward's unset output_hidden_states is the config's, as in transformers
    hf, ours = hf_class.from_pretrained(tmp_path, output_hidden_states=True), ernie45.from_pretrained(tmp_path, output_hidden_states=True)
    with torch.no_grad():
        expected, got = hf(ids).hidden_states, ours(ids).hidden_states
    assert len(got) == len(expected) == 4
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_matches_transformers(tmp_path, tied):
    """Growing keeps every old row and draws the new ones as transformers does (mean and 1e-9 x
    covariance of the old rows: equal to its rows up to that spread); padding to a multiple and
    shrinking too; config.vocab_size follows; the head stays tied or stays its own."""
    hf, ours = pair("dense", tmp_path, tie_word_embeddings=tied, use_bias=True)
    old = ours.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    hf.resize_token_embeddings(203)
    torch.manual_seed(0)
    embedding = ours.resize_token_embeddings(203)
    assert embedding is ours.get_input_embeddings() and ours.config.vocab_size == ours.vocab_size == 203
    assert torch.equal(embedding.weight[:160], old)
    torch.testing.assert_close(embedding.weight, hf.get_input_embeddings().weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=1e-4)
    assert (ours.lm_head.weight is embedding.weight) == tied
    ids = torch.randint(0, 203, (2, 7))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-3)
    ids = torch.randint(0, 160, (2, 7))  # old tokens only: the old logits, plus the new columns
    torch.testing.assert_close(ours(ids).logits[..., :160], hf(ids).logits[..., :160])
    hf.resize_token_embeddings(150, pad_to_multiple_of=64)
    ours.resize_token_embeddings(150, pad_to_multiple_of=64)
    assert ours.config.vocab_size == hf.config.vocab_size == 192 and ours.lm_head.weight.shape == (192, 64)
    ours.resize_token_embeddings(100, mean_resizing=False)
    assert torch.equal(ours.get_input_embeddings().weight, old[:100]) and ours(ids % 100).logits.shape == (2, 7, 100)
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    with pytest.raises(ValueError, match="new_num_tokens=0 must be a positive integer"):
        ours.resize_token_embeddings(0)


def test_gradient_checkpointing_switches_as_transformers():
    """transformers' switches turn ernie45's block checkpointing on and off; gradients unchanged."""
    reference, model = moe_model(), moe_model()
    ids = torch.randint(0, 160, (2, 9))
    reference(ids, labels=ids).loss.backward()
    assert model.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    recomputed = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: recomputed.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(recomputed) == 2  # forward, and again in backward
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, dict(reference.named_parameters())[name].grad, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    recomputed.clear()
    model(ids, labels=ids).loss.backward()
    assert len(recomputed) == 1
    with pytest.raises(ValueError, match="only use_reentrant"):
        model.gradient_checkpointing_enable({"preserve_rng_state": False})
    model.activation_checkpointing_enable(every_n_layers=2)  # transformers 5's name and rule: blocks 0, 2, ...
    assert model.is_activation_checkpointing
    counts = [0, 0, 0]
    for index, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
    model(ids, labels=ids).loss.backward()
    assert counts == [2, 1, 2]


# ----- AutoModel's names -----------------------------------------------------------------------------
def test_moe_config_takes_automodels_fields():
    hf_config = tiny_moe_config()
    automodel_style = MoEConfig(
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=0, n_limited_groups=0,
        train_gate=False, gate_bias_update_factor=0.0, aux_loss_coeff=0.001, score_func="softmax_with_bias",
        route_scale=1.0, dim=32, inter_dim=48, moe_inter_dim=16, norm_topk_prob=True, router_bias=False,
        expert_bias=False, expert_activation="swiglu", softmax_before_topk=False, shared_expert_inter_dim=16,
        shared_expert_activation="swiglu", force_e_score_correction_bias=True, dtype="float32",
    )  # fmt: skip
    model = Ernie4_5_MoeForCausalLM.from_config(hf_config, moe_config=automodel_style)
    layer = model.moe_layers()[0]
    assert not layer.gate.weight.requires_grad  # train_gate=False is honoured
    assert model.moe_config.score_func == "softmax_with_bias"  # read back as written, as AutoModel's own tests do
    assert layer.experts.gate_up_proj.requires_grad
    reference = Ernie4_5_MoeForCausalLM.from_config(hf_config)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 160, (2, 6))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)  # softmax_with_bias == ERNIE's rule


def test_gate_precision_defaults_to_fp32_on_a_copy_of_the_backend():
    """AutoModel's rule: the router computes in ``BackendConfig.gate_precision``, float32 when unset,
    set on the model's copy of the backend (the caller's is left as given)."""
    backend = BackendConfig()
    model = Ernie4_5_MoeModel(tiny_moe_config(), backend)
    assert backend.gate_precision is None and model.backend.gate_precision == torch.float32
    assert model.layers["1"].mlp.gate.gate_precision == torch.float32
    chosen = Ernie4_5_MoeModel(tiny_moe_config(), BackendConfig(gate_precision=torch.bfloat16))
    assert chosen.layers["1"].mlp.gate.gate_precision == torch.bfloat16


def test_layers_read_as_transformers_list_and_as_automodels_dict():
    """transformers' ``layers[0]`` / ``[-1]`` / slices / iteration and AutoModel's ``layers["1"]`` /
    ``.items()`` name the same blocks; checkpoint names stay ``model.layers.{i}``."""
    model = Ernie4_5_MoeForCausalLM(tiny_moe_config(num_hidden_layers=4))
    layers = model.model.layers
    blocks = list(layers)
    assert len(layers) == len(blocks) == 4
    assert layers[0] is layers["0"] is blocks[0] and layers[-1] is layers["3"] is blocks[3]
    assert list(layers[1:3]) == blocks[1:3] and [key for key, _ in layers.items()] == ["0", "1", "2", "3"]
    assert type(layers["0"].mlp).__name__ == "Ernie4_5MLP" and type(layers["1"].mlp).__name__ == "MoELayer"
    assert "model.layers.3.mlp.experts.gate_up_proj" in model.state_dict()
    with pytest.raises(IndexError, match=r"no decoder layer 4 here: this model holds layers \['0', '1', '2', '3'\]"):
        layers[4]


@pytest.mark.parametrize("field, value", [
    ("n_expert_groups", 4), ("router_bias", True), ("expert_bias", True), ("expert_activation", "relu2"),
    ("softmax_before_topk", True), ("shared_expert_gate", True), ("shared_expert_inter_dim", 99),
    ("score_func", "sigmoid"),
])  # fmt: skip
def test_moe_config_refuses_what_ernie_cannot_use_by_name(field, value):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        MoEConfig(n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, dim=32, moe_inter_dim=16, **{field: value})


def test_unread_backend_settings_are_refused():
    with pytest.raises(ValueError, match="enable_fsdp_optimizations"):
        BackendConfig(enable_fsdp_optimizations=True)
    assert not hasattr(Ernie4_5ForCausalLM(tiny_dense_config(), BackendConfig(enable_hf_state_dict_adapter=False)), "state_dict_adapter")


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_adapter_round_trips_transformers_state_dicts(kind, tmp_path):
    _, ours = pair(kind, tmp_path)
    adapter = ours.state_dict_adapter
    assert isinstance(adapter, Ernie4_5_MoeStateDictAdapter if kind == "moe" else Ernie4_5StateDictAdapter)
    # transformers fuses experts in memory; its *file* layout (per expert) is what the adapter speaks
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    native = adapter.from_hf(dict(on_disk))
    ours_state = {k: v for k, v in ours.state_dict().items() if k in native}
    assert set(native) == set(ours_state) and all(torch.equal(native[k], ours_state[k]) for k in native)
    back = adapter.to_hf(ours.state_dict(), exclude_key_regex=r"lm_head\..*")
    assert set(back) == set(on_disk) - {"lm_head.weight"} and all(torch.equal(back[k], on_disk[k]) for k in back)
    assert adapter.convert_single_tensor_to_hf("model.norm.weight", ours.model.norm.weight)[0][0] == "model.norm.weight"
