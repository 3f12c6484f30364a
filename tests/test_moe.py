"""MoE ERNIE 4.5 vs transformers in float32 (logits and every gradient), plus the MoE pieces alone:
router math, dispatch contract, both expert kernels, fake gate, balancing, fp32 protection, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Ernie4_5_MoeForCausalLM as HFMoe

import ernie45
from ernie45 import BackendConfig, Ernie4_5_MoeForCausalLM, MoEConfig
from ernie45.models.mlp import swiglu
from ernie45.moe import (
    GroupedExperts,
    LocalDispatcher,
    MoELayer,
    collect_tokens_per_expert,
    experts_grouped_mm,
    experts_loop,
    fake_balanced_routing,
    update_correction_bias,
)
from ernie45.moe.experts import ExpertLoRA, grouped_linear

from builders import random_hf_moe, tiny_moe_config

BACKENDS = ["torch", "torch_mm"]


def load_pair(tmp_path, config, backend=None, **hf_kwargs):
    """(transformers model, ours loaded from its save_pretrained through the adapter)."""
    hf = random_hf_moe(config, **hf_kwargs)
    hf.save_pretrained(tmp_path)
    return hf, ernie45.from_pretrained(tmp_path, backend=backend)


def hf_name(name: str) -> str:
    return name.replace("mlp.moe_statics.", "mlp.gate.moe_statics.")


def max_grad_diff(ours, hf) -> dict[str, float]:
    hf_params = dict(hf.named_parameters())
    return {n: (p.grad - hf_params[hf_name(n)].grad).abs().max().item() for n, p in ours.named_parameters()}


def assert_parity(hf, ours, ids, attention_mask=None):
    """Logits at real positions and the gradient of every parameter, in fp32."""
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    weights = torch.randn(*ids.shape, hf.config.vocab_size, generator=torch.Generator().manual_seed(5))
    outs = {}
    for name, model in (("hf", hf), ("ours", ours)):
        model.zero_grad()
        logits = model(ids, attention_mask=attention_mask).logits
        (logits * weights)[keep].sum().backward()  # only real positions feed the loss
        outs[name] = logits.detach()
    torch.testing.assert_close(outs["ours"][keep], outs["hf"][keep], rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    our_params = dict(ours.named_parameters())
    assert {hf_name(n) for n in our_params} == {n for n, p in hf_params.items() if p.requires_grad}
    for name, param in our_params.items():
        expected = hf_params[hf_name(name)].grad
        scale = max(1.0, expected.abs().max().item())  # tied embeddings sum large head gradients
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


# ----- parity with transformers --------------------------------------------------------------------
CONFIGS = {
    "shared0_top2": dict(moe_num_shared_experts=0),
    "shared1_top1": dict(moe_num_shared_experts=1, moe_k=1),
    "shared2_top4": dict(moe_num_shared_experts=2, moe_k=4),
    "moe_from_layer0": dict(moe_layer_start_index=0),
    "interval2_end_before_last": dict(
        num_hidden_layers=4, moe_layer_start_index=0, moe_layer_interval=2, moe_layer_end_index=2
    ),
    "bias_untied": dict(use_bias=True, tie_word_embeddings=False),
    "bias_tied": dict(use_bias=True),  # the tied head still has its own bias
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_grads_match_transformers(tmp_path, name, backend):
    hf, ours = load_pair(tmp_path, tiny_moe_config(**CONFIGS[name]), BackendConfig(experts=backend))
    ids = torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(1))
    assert_parity(hf, ours, ids)


def test_layer_schedule_matches_transformers():
    config = tiny_moe_config(num_hidden_layers=6, moe_layer_start_index=1, moe_layer_interval=2, moe_layer_end_index=4)
    ours = Ernie4_5_MoeForCausalLM(config)
    hf = HFMoe(config)
    kinds = [type(layer.mlp).__name__ for layer in ours.model.layers]
    hf_kinds = [type(layer.mlp).__name__ for layer in hf.model.layers]
    assert [k == "MoELayer" for k in kinds] == [k.endswith("SparseMoeBlock") for k in hf_kinds]
    assert [layer.layer_idx for layer in ours.moe_layers()] == [1, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_matches_transformers_and_skips_experts(tmp_path, backend):
    hf, ours = load_pair(tmp_path, tiny_moe_config(), BackendConfig(experts=backend))
    ids = torch.randint(3, 160, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0  # one real token
    ids = ids.masked_fill(mask == 0, 0)
    assert_parity(hf, ours, ids, attention_mask=mask)
    real = int(mask.sum())
    for counts in collect_tokens_per_expert(ours).values():
        assert int(counts.sum()) == real * hf.config.moe_k  # padding is neither routed nor counted


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_correction_bias_changes_selection_and_matches(tmp_path, backend):
    hf, ours = load_pair(tmp_path, tiny_moe_config(), BackendConfig(experts=backend), bias_std=0.3)
    ids = torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(3))
    layer = ours.moe_layers()[0]
    x = torch.randn(22, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        biased = layer.gate(x, layer.moe_statics.e_score_correction_bias)
        unbiased = layer.gate(x, None)
    assert not torch.equal(biased.topk_idx.sort(-1).values, unbiased.topk_idx.sort(-1).values)
    # the weights still come from the unbiased softmax of the chosen experts
    chosen = unbiased.probs.gather(-1, biased.topk_idx)
    torch.testing.assert_close(biased.topk_weight, chosen / chosen.sum(-1, keepdim=True))
    assert_parity(hf, ours, ids)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_automodel_plain_softmax_router_ignores_the_correction_bias(tmp_path, norm_topk_prob):
    """score_func="softmax" is AutoModel's plain softmax router: experts chosen by top-k of the logits,
    weights the softmax over the chosen logits; "softmax_with_bias" (the default) is ERNIE's rule."""
    hf, ernie_rule = load_pair(tmp_path, tiny_moe_config(), bias_std=0.3)
    overrides = {"score_func": "softmax", "norm_topk_prob": norm_topk_prob}
    plain = Ernie4_5_MoeForCausalLM.from_config(hf.config, moe_overrides=overrides)
    plain.load_state_dict(ernie_rule.state_dict())
    assert ernie_rule.moe_config.score_func == "softmax_with_bias" and plain.moe_config.score_func == "softmax"
    x = torch.randn(22, 32, generator=torch.Generator().manual_seed(4))
    layer, reference = plain.moe_layers()[0], ernie_rule.moe_layers()[0]
    with torch.no_grad():
        logits = x @ layer.gate.weight.T
        top_logits, top_idx = logits.topk(hf.config.moe_k, dim=-1)  # AutoModel's Gate, softmax_before_topk=False
        expected = naive_moe(layer, x, top_idx, top_logits.softmax(-1))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        counts = torch.bincount(top_idx.flatten(), minlength=hf.config.moe_num_experts)
        assert torch.equal(layer.last_record.tokens_per_expert, counts)
        reference(x)
        assert not torch.equal(reference.last_record.tokens_per_expert, counts)  # the bias moved the choice


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_loss_and_the_loss_it_weighs_into_match_transformers(tmp_path, backend):
    hf, ours = load_pair(tmp_path, tiny_moe_config(), BackendConfig(experts=backend))
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # predicted from a padding position, whose hidden state differs by design
    expected = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    got = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    plain = ours(ids, attention_mask=mask, labels=labels)
    assert plain.aux_loss is None and plain.router_logits is None
    torch.testing.assert_close(got.loss, expected.loss)  # as transformers: weighted in when asked for
    torch.testing.assert_close(plain.loss + hf.router_aux_loss_coef * got.aux_loss, got.loss)
    assert len(got.router_logits) == len(ours.moe_layers())
    got.aux_loss.backward()
    assert ours.moe_layers()[0].gate.weight.grad.abs().sum() > 0
    # What a layer keeps of its last forward is its record: expert loads [E] and router scores [T,E].
    records = [layer.last_record for layer in ours.moe_layers()]
    assert all(r.router_probs.shape == (ids.numel(), hf.config.moe_num_experts) for r in records)


def test_aux_loss_on_by_coefficient():
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config(), moe_overrides={"aux_loss_coeff": 0.01})
    out = model(torch.randint(0, 160, (1, 5)))
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    assert model(torch.randint(0, 160, (1, 5)), output_router_logits=False).aux_loss is None


def test_bf16_keeps_router_fp32_and_is_as_accurate_as_transformers(tmp_path):
    hf32, _ = load_pair(tmp_path, tiny_moe_config())
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(7))
    hf16 = HFMoe.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours16 = ernie45.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for model in (ours16, Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config(), dtype=torch.bfloat16)):
        for layer in model.moe_layers():
            assert layer.gate.weight.dtype == torch.float32
            assert layer.moe_statics.e_score_correction_bias.dtype == torch.float32
            assert layer.experts.gate_up_proj.dtype == torch.bfloat16
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        truth = hf32(ids).logits
        hf_err = (hf16(ids).logits.float() - truth).abs().mean()
        our_err = (ours16(ids).logits.float() - truth).abs().mean()
    assert our_err <= hf_err * 1.1, (our_err, hf_err)


def test_to_bfloat16_does_not_round_router():
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config())
    layer = model.moe_layers()[0]
    layer.moe_statics.e_score_correction_bias.normal_()
    weight = layer.gate.weight.detach().clone()
    bias = layer.moe_statics.e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    assert layer.experts.down_proj.dtype == torch.bfloat16
    assert torch.equal(layer.gate.weight, weight) and torch.equal(layer.moe_statics.e_score_correction_bias, bias)
    model.half()
    assert layer.gate.weight.dtype == torch.float32
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in model.state_dict()
    assert all("e_score_correction_bias" not in n for n, _ in model.named_parameters())


# ----- the MoE layer alone -----------------------------------------------------------------------
def naive_moe(layer: MoELayer, x: torch.Tensor, topk_idx=None, topk_weight=None) -> torch.Tensor:
    """sum_k w_k expert_k(x) + shared(x), token by token (routing: the layer's gate unless given)."""
    if topk_idx is None:
        routing = layer.gate(x, layer.moe_statics.e_score_correction_bias)
        topk_idx, topk_weight = routing.topk_idx, routing.topk_weight
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for e, w in zip(topk_idx[t].tolist(), topk_weight[t]):
            g, u = (gate_up[e] @ x[t]).chunk(2)
            acc = acc + w * (down[e] @ (torch.nn.functional.silu(g) * u))
        rows.append(acc)
    out = torch.stack(rows)
    return out + layer.shared_experts(x) if layer.shared_experts is not None else out


def make_layer(backend="torch", experts=8, top_k=2, shared=1, dim=32, inter=16, **backend_kwargs) -> MoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(
        n_routed_experts=experts, n_shared_experts=shared, n_activated_experts=top_k, dim=dim, moe_inter_dim=inter
    )
    layer = MoELayer(moe, BackendConfig(experts=backend, **backend_kwargs), layer_idx=0)
    for module in layer.modules():
        if hasattr(module, "init_weights"):
            module.init_weights(0.3)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.1)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_equals_naive_sum(backend):
    layer = make_layer(backend)
    x = torch.randn(13, 32)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_on_one_expert_and_empty_experts(backend):
    layer = make_layer(backend, top_k=1)
    with torch.no_grad():
        layer.moe_statics.e_score_correction_bias[0, 5] = 10.0  # everything goes to expert 5
    x = torch.randn(9, 32, requires_grad=True)
    out = layer(x)
    assert layer.last_record.tokens_per_expert.tolist() == [0, 0, 0, 0, 0, 9, 0, 0]
    torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-6)
    out.sum().backward()  # an expanded gradient: _grouped_mm's backward needs it contiguous
    grad = layer.experts.gate_up_proj.grad
    assert grad[5].abs().sum() > 0 and grad[[0, 1, 2, 3, 4, 6, 7]].abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_gives_shared_only(backend):
    layer = make_layer(backend)
    x = torch.randn(2, 3, 32)
    out = layer(x, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(out, layer.shared_experts(x))
    assert layer.last_record.tokens_per_expert.sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_equals_loop(dtype):
    """Both kernels, forward and backward, including empty experts."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 1, 0, 0, 7])
    x = torch.randn(int(counts.sum()), 32, dtype=dtype, requires_grad=True)
    gate_up = torch.randn(8, 32, 32, dtype=dtype, requires_grad=True)
    down = torch.randn(8, 32, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], 32, dtype=dtype)
    results = []
    for fn in (experts_loop, experts_grouped_mm):
        out = fn(x, gate_up, down, counts)
        out.backward(grad)
        results.append((out.detach(), x.grad.clone(), gate_up.grad.clone(), down.grad.clone()))
        x.grad = gate_up.grad = down.grad = None
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for loop, mm in zip(*results):
        torch.testing.assert_close(mm, loop, **tol)


def _kept_bytes(run):
    """(result of ``run()``, bytes of the distinct storages autograd saved while it ran)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapted", ["none", "gate_up", "down", "frozen_down"])
def test_grouped_experts_make_the_swiglu_output_again_with_the_unfused_bits(dtype, adapted):
    """Without an adapter on ``down`` the grouped path keeps gate/up and not the [N,I] SwiGLU output
    (where down trains), and gives autograd's bits for the unfused products (output and every
    gradient, empty experts included); an adapted ``down`` runs unfused."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 1, 0, 0, 7])
    x = torch.randn(int(counts.sum()), 32, dtype=dtype)
    weights = {"gate_up": torch.randn(8, 32, 32, dtype=dtype), "down": torch.randn(8, 32, 16, dtype=dtype)}
    loras = {name: ExpertLoRA(torch.randn(8, 4, w.shape[2], dtype=dtype), torch.randn(8, w.shape[1], 4, dtype=dtype), 0.5)
             for name, w in weights.items() if adapted == name}  # fmt: skip
    grad = torch.randn(x.shape[0], 32, dtype=dtype)

    def step(fused: bool):
        leaves = [t.clone().requires_grad_(not (adapted == "frozen_down" and t is weights["down"]))
                  for t in (x, weights["gate_up"], weights["down"])]  # fmt: skip
        adapters = {name: ExpertLoRA(a.clone().requires_grad_(), b.clone().requires_grad_(), scale)
                    for name, (a, b, scale) in loras.items()}  # fmt: skip

        def forward():
            gate_up_lora, down_lora = adapters.get("gate_up"), adapters.get("down")
            if fused:
                return experts_grouped_mm(*leaves, counts, gate_up_lora, down_lora)
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gate, up = grouped_linear(leaves[0], leaves[1], offs, gate_up_lora).chunk(2, dim=-1)
            return grouped_linear(swiglu(gate, up), leaves[2], offs, down_lora)

        out, kept = _kept_bytes(forward)
        out.backward(grad)
        grads = [t.grad for t in leaves] + [t.grad for lora in adapters.values() for t in lora[:2]]
        return out, grads, kept

    ours, our_grads, our_kept = step(fused=True)
    reference, reference_grads, reference_kept = step(fused=False)
    assert torch.equal(ours, reference)
    assert [g is None for g in our_grads] == [g is None for g in reference_grads]
    assert (our_grads[2] is None) == (adapted == "frozen_down")
    for got, expected in zip(our_grads, reference_grads):
        assert got is None or torch.equal(got, expected)
    # NOTE: autograd keeps the SwiGLU output only for down's weight gradient (none when it is frozen)
    swiglu_output = x.shape[0] * weights["down"].shape[2] * x.element_size()
    assert reference_kept - our_kept == (0 if adapted in ("down", "frozen_down") else swiglu_output)


def test_grouped_mm_falls_back_when_misaligned():
    experts = GroupedExperts(4, dim=6, inter_dim=4, backend="torch_mm")  # 24-byte rows: not 16-aligned
    experts.init_weights(0.1)
    counts = torch.tensor([2, 0, 1, 1])
    x = torch.randn(4, 6)
    torch.testing.assert_close(experts(x, counts), experts_loop(x, experts.gate_up_proj, experts.down_proj, counts))


def test_dispatch_contract_with_identity_experts():
    """combine(dispatch(x)) with identity experts is the weighted sum of x; padding rows are 0."""
    dispatcher = LocalDispatcher(num_experts=4)
    x = torch.randn(5, 8)
    idx = torch.tensor([[0, 3], [3, 1], [2, 0], [1, 2], [3, 0]])
    w = torch.rand(5, 2)
    keep = torch.tensor([True, True, False, True, True])
    x_sorted, counts, state = dispatcher.dispatch(x, idx, w, keep)
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 2, 1, 3]
    assert x_sorted.shape == (8, 8)
    out = dispatcher.combine(x_sorted, state)
    expected = x * w.sum(-1, keepdim=True) * keep[:, None]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_combine_is_autograds_index_add_keeping_fewer_tensors(dtypes):
    """combine gives autograd's bits for ``index_add(y * w)`` (output and both gradients, also bf16
    rows with fp32 weights), and keeps one [N,H] tensor for backward where autograd keeps two."""
    y_dtype, w_dtype = dtypes
    dispatcher = LocalDispatcher(num_experts=4)
    idx = torch.tensor([[0, 3], [3, 1], [2, 0], [1, 2], [3, 0], [1, 1]])
    x = torch.randn(6, 8).to(y_dtype)
    x_sorted, _, state = dispatcher.dispatch(x, idx, torch.rand(6, 2).to(w_dtype))
    grad = torch.randn(6, 8).to(y_dtype)

    def run(combine):
        y = x_sorted.detach().clone().requires_grad_()
        weight = state.weight.detach().clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = combine(y, weight)
        out.backward(grad)
        return out, y.grad, weight.grad, saved.count(y.shape)

    ours = run(lambda y, w: dispatcher.combine(y, state._replace(weight=w)))
    autograd = run(lambda y, w: y.new_zeros(6, 8).index_add(0, state.token_idx, y * w[:, None].to(y.dtype)))
    for got, expected in zip(ours[:3], autograd[:3]):
        assert torch.equal(got, expected)
    assert (ours[3], autograd[3]) == (1, 2)


def test_fake_balanced_gate_is_round_robin():
    layer = make_layer("torch_mm", fake_balanced_gate=True)
    out = layer(torch.randn(16, 32))
    assert out.shape == (16, 32)
    assert layer.last_record.tokens_per_expert.tolist() == [4] * 8  # 16 tokens * 2 / 8 experts
    noisy = fake_balanced_routing(16, 8, 3, torch.float32, torch.device("cpu"), noise=1.0)
    assert all(len(set(row)) == 3 for row in noisy.topk_idx.tolist())  # still K distinct experts
    torch.testing.assert_close(noisy.topk_weight, torch.full((16, 3), 1 / 3))


# ----- balancing, config, capabilities ----------------------------------------------------------
def test_update_correction_bias():
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config())
    model(torch.randint(0, 160, (2, 8)))
    counts = collect_tokens_per_expert(model)
    assert sorted(counts) == [1, 2] and all(int(c.sum()) == 16 * 2 for c in counts.values())
    update_correction_bias(model, counts)  # default rate: gate_bias_update_factor = 0 -> no-op
    assert all(layer.moe_statics.e_score_correction_bias.abs().sum() == 0 for layer in model.moe_layers())
    load = torch.tensor([10, 0, 4, 4, 4, 4, 4, 2])  # mean 4
    update_correction_bias(model, {1: load}, rate=0.01)
    bias = model.moe_layers()[0].moe_statics.e_score_correction_bias
    torch.testing.assert_close(bias, 0.01 * torch.tensor([[-1.0, 1, 0, 0, 0, 0, 0, 1]]))
    assert model.moe_layers()[1].moe_statics.e_score_correction_bias.abs().sum() == 0
    update_correction_bias(model, torch.stack([load, load]), rate=0.01)  # [L_moe, E] in layer order
    torch.testing.assert_close(model.moe_layers()[1].moe_statics.e_score_correction_bias, bias / 2)
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        update_correction_bias(model, {0: load}, rate=0.01)


def test_moe_config_from_hf_and_overrides():
    config = tiny_moe_config(moe_num_shared_experts=2, moe_norm_min=1e-6)
    moe = MoEConfig.from_hf_config(config)
    assert (moe.n_routed_experts, moe.n_activated_experts, moe.n_shared_experts) == (8, 2, 2)
    assert (moe.dim, moe.moe_inter_dim, moe.shared_inter_dim, moe.norm_min) == (32, 16, 32, 1e-6)
    assert moe.aux_loss_coeff == 0.0 and moe.gate_bias_update_factor == 0.0 and moe.score_func == "softmax_with_bias"
    assert MoEConfig.from_hf_config(tiny_moe_config(output_router_logits=True)).aux_loss_coeff == 0.001
    model = Ernie4_5_MoeForCausalLM(config, moe_overrides={"n_activated_experts": 3})
    assert model.moe_config.n_activated_experts == 3 and model.moe_layers()[0].gate.top_k == 3
    assert model.config.moe_k == 3 and config.moe_k == 2  # the saved config describes the model
    with pytest.raises(ValueError, match="Cannot pass both moe_config and moe_overrides"):  # AutoModel's words
        Ernie4_5_MoeForCausalLM(config, moe_config=moe, moe_overrides={"route_scale": 2.0})
    with pytest.raises(ValueError, match="unknown MoEConfig key"):
        Ernie4_5_MoeForCausalLM(config, moe_overrides={"topk": 3})
    with pytest.raises(ValueError, match="n_activated_experts=9"):
        dataclasses.replace(moe, n_activated_experts=9)


def test_capabilities_and_auto_class(tmp_path):
    caps = Ernie4_5_MoeForCausalLM.get_capabilities(tiny_moe_config())
    assert caps.is_moe and caps.expert_backends == ("torch", "torch_mm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.supports_ep = True
    assert ernie45.model_class_for(tiny_moe_config()) is Ernie4_5_MoeForCausalLM
    assert ernie45.models.ernie4_5_moe.ModelClass is Ernie4_5_MoeForCausalLM
