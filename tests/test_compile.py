"""``compile_blocks``: each decoder block's training forward compiled, eval and generation eager.

Against the same model uncompiled (fp32, random weights): ``aot_eager`` (the compiler's graphs run
on eager kernels) must give the same bits; inductor (generated kernels) the same values to 1e-5.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch._dynamo
from builders import dense_model, moe_model, token_batch

from ernie45.training.compile import CompileSettings, check_settings, compile_blocks

LENGTHS = (9, 13, 9)  # a second length makes torch mark the sequence dynamic; then no new graph


def compiled_twin(model, **settings):
    twin = copy.deepcopy(model)
    compile_blocks(twin, CompileSettings(**settings))
    return twin


def train_both(eager, compiled) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Losses of both for each length in LENGTHS, gradients accumulated over all of them."""
    eager.train(), compiled.train()
    losses = []
    for length in LENGTHS:
        ids = token_batch(eager.config.vocab_size, 2, length, seed=length)
        pair = eager(ids, labels=ids).loss, compiled(ids, labels=ids).loss
        for loss in pair:
            loss.backward()
        losses.append(pair)
    return losses


def gradients(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("build", [dense_model, moe_model], ids=["dense", "moe"])
def test_aot_eager_blocks_give_the_same_bits_and_eval_stays_eager(build):
    torch._dynamo.reset()
    eager = build(seed=3)
    compiled = compiled_twin(eager, backend="aot_eager")
    for ours, reference in train_both(eager, compiled):
        assert torch.equal(ours, reference)
    for ours, reference in zip(gradients(compiled), gradients(eager), strict=True):
        assert torch.equal(ours, reference)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.eval(), eager.eval()
    ids = token_batch(eager.config.vocab_size, 1, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, eager(ids).logits)
        assert torch.equal(compiled.generate(ids, max_new_tokens=4, do_sample=False), eager.generate(ids, max_new_tokens=4, do_sample=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled in eval mode


@pytest.mark.slow
def test_inductor_blocks_train_as_eager_to_1e_5():
    torch._dynamo.reset()
    eager = dense_model(seed=4)
    compiled = compiled_twin(eager)
    for ours, reference in train_both(eager, compiled):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(gradients(compiled), gradients(eager), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [dense_model, moe_model], ids=["dense", "moe"])
def test_a_deep_copy_runs_its_own_blocks(build):
    """A copy made after compiling (a reference or EMA model) computes with its own weights."""
    torch._dynamo.reset()
    compiled = compiled_twin(build(seed=6), backend="aot_eager")
    copy_ = copy.deepcopy(compiled).train()
    for ours, original in zip(copy_.model.layers, compiled.model.layers, strict=True):
        assert ours.forward.__func__ is original.forward.__func__ and ours.forward.__self__ is ours  # compiled, own block
    with torch.no_grad():
        for param in copy_.model.layers.parameters():
            param.mul_(0.5)
    eager_copy = build(seed=6).train()
    eager_copy.load_state_dict(copy_.state_dict())
    ids = token_batch(compiled.config.vocab_size, 2, 9, seed=2)
    expected = eager_copy(ids, labels=ids).loss
    assert torch.equal(copy_(ids, labels=ids).loss, expected)
    assert not torch.equal(compiled.train()(ids, labels=ids).loss, expected)


def test_compiling_twice_is_refused():
    model = compiled_twin(dense_model(seed=1), backend="aot_eager")
    with pytest.raises(ValueError, match=re.escape("has a forward of its own (compiled already?): compile the blocks once")):
        compile_blocks(model, CompileSettings(backend="aot_eager"))


def test_state_dict_and_names_are_unchanged():
    model = dense_model(seed=1)
    compiled = compiled_twin(model, backend="aot_eager")
    assert list(compiled.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mode="fast"), "mode='fast' is not a torch.compile mode"),
        (dict(mode="max-autotune", options={"max_autotune": True}), "mode and options are exclusive"),
        (dict(options={"no_such_option": 1}), "['no_such_option'] are not inductor options"),
        (dict(backend="tensorrt_nope"), "backend='tensorrt_nope' is not a torch.compile backend"),
        (dict(dynamo_cache_size_limit=0), "dynamo_cache_size_limit=0 must be >= 1"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError) as err:
        check_settings(CompileSettings(**settings))
    assert message in str(err.value)


def test_fullgraph_and_activation_checkpointing_are_refused_for_moe_blocks():
    with pytest.raises(ValueError, match="fullgraph=true: a MoE block's routed experts run eagerly"):
        compile_blocks(moe_model(seed=0), CompileSettings(fullgraph=True, backend="aot_eager"))
    checkpointed = moe_model(seed=0)
    checkpointed.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation checkpointing of a MoE model cannot run compiled blocks"):
        compile_blocks(checkpointed, CompileSettings(backend="aot_eager"))


def test_torch_compile_keywords():
    assert CompileSettings().torch_compile_kwargs() == dict(fullgraph=False, dynamic=None, mode="default")
    options = CompileSettings(options={"max_autotune": True}, backend="inductor", dynamic=True).torch_compile_kwargs()
    assert options == dict(fullgraph=False, dynamic=True, options={"max_autotune": True}, backend="inductor")
