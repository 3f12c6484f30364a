"""LoRA (ernie45.peft) against HF PEFT 0.21 on transformers' own ERNIE 4.5 models, in float32.

The reference is PEFT itself: our saved adapter is loaded by ``PeftModel.from_pretrained`` onto a
transformers model saved from the same weights, and adapters PEFT made are loaded into ours.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import ernie45
from builders import moe_model, randomize_adapters, saved_hf_model, token_batch
from ernie45 import BackendConfig
from ernie45.cli import app
from ernie45.moe.experts import (
    ExpertLoRA,
    expert_linear,
    experts_grouped_mm,
    experts_loop,
    grouped_linear,
    lora_compute_dtype,
)
from ernie45.moe.router import route
from ernie45.peft import (
    PeftConfig,
    adapter_parameters,
    apply_lora,
    count_parameters,
    init_lora,
    load_adapter,
    merge,
    save_adapter,
)
from ernie45.peft.adapter import PREFIX, experts_to_peft, model_specs

EVERYTHING = dict(target_modules=["*"], dim=4, alpha=8)  # every linear layer and the routed experts
F32 = dict(atol=1e-5, rtol=1e-5)


def _ours(base, experts: str = "torch_mm", **peft):
    model = ernie45.from_pretrained(
        base, dtype=torch.float32, backend=BackendConfig(experts=experts), peft=PeftConfig(**(peft or EVERYTHING))
    )
    randomize_adapters(model)
    return model


def _our_grads_in_peft_layout(model) -> dict[str, torch.Tensor]:
    grads = {}
    for spec in model_specs(model):
        module = model.get_submodule(spec.module)
        if spec.projection is None:
            a, b = module.lora_A.weight.grad, module.lora_B.weight.grad
        else:
            a, b = experts_to_peft(*(module.get_parameter(f"{spec.projection}_lora_{f}").grad for f in "AB"))
        grads[f"{PREFIX}{spec.key}.lora_A.weight"], grads[f"{PREFIX}{spec.key}.lora_B.weight"] = a, b
    return grads


def _their_grads(peft_model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def _routing_depends_on_the_bias(model, ids) -> bool:
    model(ids)
    for mlp in ernie45.moe.moe_layers(model).values():
        logits, bias = mlp.last_record.router_logits, mlp.moe_statics.e_score_correction_bias
        if not torch.equal(route(logits, bias, mlp.top_k)[1], route(logits, None, mlp.top_k)[1]):
            return True
    return False


# ----- the same adapter in ours and in PEFT ---------------------------------------------------------
@pytest.mark.parametrize(
    "kind,experts,peft",
    [
        ("dense", "torch", EVERYTHING),
        ("moe", "torch", dict(EVERYTHING, use_rslora=True)),  # written for PEFT as the equivalent alpha
        ("moe", "torch_mm", dict(EVERYTHING, moe_rank_scaling=True)),  # experts rank 2: PEFT's rank_pattern
    ],
)
def test_logits_and_lora_gradients_match_peft_on_transformers(tmp_path, kind, experts, peft):
    base, hf = saved_hf_model(tmp_path / "base", kind)
    ours = _ours(base, experts, **peft)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    ids = token_batch(hf.config.vocab_size, 2, 12)
    if kind == "moe":
        assert _routing_depends_on_the_bias(ours, ids)

    our_logits, their_logits = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(our_logits, their_logits, **F32)
    weights = torch.randn(our_logits.shape, generator=torch.Generator().manual_seed(5))
    (our_logits * weights).mean().backward()  # NOTE: a mean, as a training loss is: gradients of order 1
    (their_logits * weights).mean().backward()
    ours_g, theirs_g = _our_grads_in_peft_layout(ours), _their_grads(theirs)
    assert sorted(ours_g) == sorted(theirs_g)
    expected = {"dense": 2 * 15, "moe": 2 * 21 + 2 * 4}[kind]  # dense: 2 x 7 + lm_head; moe: 3 x 7 + experts
    assert len(ours_g) == expected
    for key in ours_g:
        torch.testing.assert_close(ours_g[key], theirs_g[key], **F32, msg=key)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_our_merge_equals_peft_merge_and_unload_and_transformers_reloads_it(tmp_path, kind):
    base, hf = saved_hf_model(tmp_path / "base", kind)
    ours = _ours(base, **dict(EVERYTHING, dim=3, alpha=5))  # NOTE: rank 3 is padded in the grouped kernel
    save_adapter(ours, tmp_path / "adapter")
    ids = token_batch(hf.config.vocab_size, 2, 10)
    adapted = ours(ids).logits.detach()

    merge(ours).save_pretrained(tmp_path / "merged")
    assert not adapter_parameters(ours)
    torch.testing.assert_close(ours(ids).logits, adapted, **F32)
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    mine = reloaded.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(reloaded(ids).logits, adapted, **F32)


@pytest.mark.parametrize(
    "kind,lora",
    [
        ("dense", dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])),
        (
            "moe",
            dict(
                target_modules=["q_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                rank_pattern={"mlp.experts.down_proj": 2},
                alpha_pattern={"o_proj": 3},
            ),
        ),
        ("moe", dict(target_modules=["k_proj"], target_parameters=["mlp.experts.down_proj"], use_rslora=True)),
    ],
)
def test_an_adapter_made_by_peft_loads_into_ours(tmp_path, kind, lora):
    base, hf = saved_hf_model(tmp_path / "base", kind)
    torch.manual_seed(3)
    made = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))  # B random too
    made.save_pretrained(tmp_path / "peft")
    ids = token_batch(hf.config.vocab_size, 2, 10)
    for experts in ("torch", "torch_mm"):
        ours = ernie45.from_pretrained(base, dtype=torch.float32, adapter=tmp_path / "peft", backend=BackendConfig(experts=experts))
        torch.testing.assert_close(ours(ids).logits, made(ids).logits, **F32)
    plain = ernie45.from_pretrained(base, dtype=torch.float32)
    load_adapter(plain, tmp_path / "peft")  # the same through the function
    torch.testing.assert_close(plain(ids).logits, made(ids).logits, **F32)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_peft_itself_adapts_our_model_as_it_adapts_transformers(tmp_path, kind):
    """HF PEFT wrapping ours (get_peft_model, as users of PEFT do): the same logits and adapter
    gradients as PEFT on transformers' model; the adapter it saves loads onto transformers' model."""
    base, hf = saved_hf_model(tmp_path / "base", kind)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    reference = get_peft_model(hf, LoraConfig(**settings))
    torch.manual_seed(5)
    wrapped = get_peft_model(ernie45.from_pretrained(base, dtype=torch.float32), LoraConfig(**settings))
    ids = token_batch(hf.config.vocab_size, 2, 10)
    expected, got = reference(ids, labels=ids), wrapped(ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits, **F32)
    expected.loss.backward()
    got.loss.backward()
    reference_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    trained = {name: p.grad for name, p in wrapped.named_parameters() if p.grad is not None}
    assert trained.keys() == reference_grads.keys() and all("lora_" in name for name in trained)
    for name, grad in trained.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    wrapped.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, got.logits, **F32)


def test_merge_cli_writes_a_checkpoint_transformers_loads(tmp_path):
    base, hf = saved_hf_model(tmp_path / "base", "moe")
    ours = _ours(base)
    save_adapter(ours, tmp_path / "adapter")
    result = CliRunner().invoke(
        app, ["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    ids = token_batch(hf.config.vocab_size, 2, 10)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(merged(ids).logits, ours(ids).logits, **F32)

    missing = CliRunner().invoke(app, ["merge", "--model", str(base), "--adapter", str(tmp_path), "--output", str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert f"no adapter_config.json in {tmp_path}" in missing.output and "Traceback" not in missing.output


# ----- what is trained ------------------------------------------------------------------------------
def test_only_adapter_tensors_train_and_the_router_is_never_adapted():
    model = moe_model()
    names = apply_lora(model, PeftConfig(target_modules=["*"], dim=4, moe_rank_scaling=True))
    init_lora(model, seed=1)
    adapters = adapter_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(adapters)
    # 3 layers x (q,k,v,o + the dense MLP or the shared expert's 3) linear pairs + 2 MoE layers x 2 expert pairs;
    # the tied lm_head and the router (mlp.gate) are left alone
    assert len(adapters) == 3 * 7 * 2 + 2 * 2 * 2
    assert "lm_head" not in names and not any(n.endswith("mlp.gate") for n in names)
    assert all(".gate." not in n for n in adapters)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj_lora_A.shape == (8, 2, 32)  # moe_rank_scaling: rank dim // top-2
    assert experts.down_proj_lora_B.shape == (8, 32, 2)
    trainable, total = count_parameters(model)
    # attention 3 x 896, dense MLP 960, shared experts 2 x 576, routed experts 2 x (2 x 512 + 256 + 512)
    assert trainable == sum(p.numel() for p in adapters.values()) == 3 * 896 + 960 + 2 * 576 + 2 * 1792
    assert total == trainable + sum(p.numel() for p in model.parameters() if not p.requires_grad)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(model.config.vocab_size, 2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert len(optimizer.state) == len(adapters)  # optimizer state exists for adapter tensors only
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)  # B left zero and moved


def test_fresh_adapters_start_as_the_base_model_and_are_drawn_the_same_each_time():
    model = moe_model()
    ids = token_batch(model.config.vocab_size, 2, 8)
    before = model(ids).logits
    apply_lora(model, PeftConfig(target_modules=["*"], dim=4, lora_A_init="kaiming"))
    init_lora(model, "kaiming", seed=7)
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    again = moe_model()
    apply_lora(again, PeftConfig(target_modules=["*"], dim=4, lora_A_init="kaiming"))
    init_lora(again, "kaiming", seed=7)
    for (name, p), q in zip(adapter_parameters(model).items(), adapter_parameters(again).values()):
        assert torch.equal(p, q), name
        assert (p.abs().sum() > 0) == ("lora_A" in name)


@pytest.mark.parametrize("rank", [3, 8])
def test_grouped_kernel_applies_expert_lora_as_the_loop_does(rank):
    generator = torch.Generator().manual_seed(0)
    experts, hidden, inter = 4, 32, 16
    x = torch.randn(11, hidden, generator=generator, requires_grad=True)
    counts = torch.tensor([3, 0, 6, 2])  # an empty expert included
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.2
    down = torch.randn(experts, hidden, inter, generator=generator) * 0.2
    shapes = [(experts, rank, hidden), (experts, 2 * inter, rank), (experts, rank, inter), (experts, hidden, rank)]
    factors = [(torch.randn(s, generator=generator) * 0.2).requires_grad_() for s in shapes]
    results = []
    for kernel in (experts_loop, experts_grouped_mm):
        out = kernel(x, gate_up, down, counts, ExpertLoRA(*factors[:2], 0.5), ExpertLoRA(*factors[2:], 2.0))
        results.append((out, torch.autograd.grad(out.square().mean(), [x, *factors])))
    torch.testing.assert_close(results[1][0], results[0][0], **F32)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, **F32)


@pytest.mark.parametrize("kernel", [experts_loop, experts_grouped_mm])
def test_bf16_experts_apply_their_adapters_in_fp32_on_a_cpu(kernel):
    """bf16 experts with fp32 adapters (a LoRA run over a bf16 base): each adapter's update is made
    in fp32 and rounded once, where it is added to the bf16 base product; the adapters' gradients
    are fp32."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(11, 32, generator=generator).to(torch.bfloat16).requires_grad_()
    counts = torch.tensor([3, 0, 6, 2])
    weight = (torch.randn(4, 16, 32, generator=generator) * 0.2).to(torch.bfloat16)
    a = (torch.randn(4, 8, 32, generator=generator) * 0.2).requires_grad_()
    b = (torch.randn(4, 16, 8, generator=generator) * 0.2).requires_grad_()
    assert lora_compute_dtype(x) == torch.float32  # what GroupedExperts casts the adapters to here
    out = grouped_linear_of(kernel, x, weight, counts, ExpertLoRA(a, b, 0.5))
    expected = []
    for expert, rows in enumerate(x.detach().float().split(counts.tolist())):
        base = torch.nn.functional.linear(rows.to(torch.bfloat16), weight[expert])
        expected.append(base + ((rows @ a[expert].T) * 0.5 @ b[expert].T).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.cat(expected), atol=0, rtol=0)
    out.float().square().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def grouped_linear_of(kernel, x, weight, counts, lora):
    """One projection through ``kernel``'s code path (the grouped kernel's or the loop's)."""
    if kernel is experts_grouped_mm:
        return grouped_linear(x, weight, torch.cumsum(counts, 0, dtype=torch.int32), lora)
    rows = x.split(counts.tolist())
    return torch.cat([expert_linear(part, weight, lora, e) for e, part in enumerate(rows)])


# ----- errors are one clear line --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dim=0), "peft.dim=0 must be a positive integer"),
        (dict(lora_A_init="gaussian"), "peft.lora_A_init='gaussian'; choose one of ('xavier', 'kaiming')"),
        (dict(target_modules=["*"], exclude_modules=["lm_head"]), "exclude each other"),
        (dict(match_all_linear=True, target_modules=["*_proj"]), "match_all_linear=true takes no"),
        (dict(dropout=1.0), "peft.dropout=1.0 must be in [0, 1)"),
        (dict(lora_dtype="int8"), "peft.lora_dtype='int8' is not a floating-point dtype"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as err:
        PeftConfig(**kwargs)
    assert message in str(err.value)


def test_targets_that_adapt_nothing_and_a_second_apply_are_refused():
    model = moe_model()
    with pytest.raises(ValueError, match=r"target_modules=\['\*\.gate'\] matched no linear layer or routed experts"):
        apply_lora(model, PeftConfig(target_modules=["*.gate"]))  # the router is never adapted
    with pytest.raises(ValueError, match="dim=1 // moe_k=2 is rank 0"):
        apply_lora(model, PeftConfig(target_modules=["*"], dim=1, moe_rank_scaling=True))
    assert not adapter_parameters(model)  # refused before anything was changed
    apply_lora(model, PeftConfig())
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        apply_lora(model, PeftConfig())
    with pytest.raises(ValueError, match="save them with ernie45.peft.save_adapter"):
        model.save_pretrained("/nonexistent/never-written")


def test_adapters_we_cannot_honour_are_refused_naming_the_file(tmp_path):
    base, hf = saved_hf_model(tmp_path / "base", "moe")
    get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True \(DoRA\) is not supported"):
        ernie45.from_pretrained(base, adapter=tmp_path / "dora")
    fresh = type(hf)(hf.config)  # NOTE: get_peft_model adapted ``hf`` in place
    get_peft_model(fresh, LoraConfig(r=2, target_modules=[], target_parameters=["mlp.gate.weight"])).save_pretrained(tmp_path / "router")
    with pytest.raises(ValueError, match=r"adapts model.layers.1.mlp.gate \(Router\).*never the router"):
        ernie45.from_pretrained(base, adapter=tmp_path / "router")
