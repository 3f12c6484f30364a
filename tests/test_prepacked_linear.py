"""Prepacked linear weights in CPU bf16 inference (models/linear.py): bitwise the same results as
``F.linear`` and as the model without them, used only inside ``prepacked_weights`` blocks where
nothing needs autograd, and never stale after the weights change (in place, through ``.data``, by
PEFT's merge, between blocks or inside one).
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers import Ernie4_5ForCausalLM as HFDense

import ernie45
from ernie45.models import BackendConfig
from ernie45.models.linear import Linear, prepacked_weights, prepacking_available, set_prepacking

from builders import random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config

pytestmark = pytest.mark.skipif(
    not prepacking_available(), reason="this CPU has no oneDNN bf16 matmul: the layer falls back to F.linear"
)


def _layer(bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 200, bias=bias, dtype=torch.bfloat16).eval()


def _packed_count(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, Linear) and m._packed is not None)


@contextlib.contextmanager
def packing(module: torch.nn.Module):
    """Inference inside a prepacked block."""
    with torch.no_grad(), prepacked_weights(module):
        yield


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96), (0, 96)])
def test_the_packed_product_is_bitwise_f_linear(bias, shape):
    layer = _layer(bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with packing(layer):
        got = layer(x)
        assert layer._packed is not None
    assert layer._packed is None  # freed with the block
    assert got.shape == (*shape[:-1], 200)
    assert torch.equal(got, F.linear(x, layer.weight, layer.bias))


def test_turning_prepacking_off_holds_inside_an_open_block():
    """set_prepacking(model, False) (as FSDP does) inside a block: the next call packs nothing."""
    layer = _layer()
    x = torch.randn(3, 96).to(torch.bfloat16)
    with packing(layer):
        layer(x)
        assert layer._packed is not None
        set_prepacking(layer, False)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None


def test_a_strided_input_takes_f_linear_itself():
    layer = _layer()
    x = torch.randn(5, 2, 96).to(torch.bfloat16).transpose(0, 1)  # F.linear rounds a strided input its own way
    with packing(layer):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None


def test_nothing_is_packed_where_autograd_or_training_needs_the_weight():
    layer = _layer()
    x = torch.randn(3, 96).to(torch.bfloat16)
    with prepacked_weights(layer):  # a block, in eval mode, but autograd on: the plain product, with a gradient
        layer(x).sum().backward()
        assert layer._packed is None and layer.weight.grad is not None
    with packing(layer):
        layer.train()(x)
        assert layer._packed is None
    fp32 = Linear(96, 200).eval()
    with packing(fp32):
        fp32(x.float())
        assert fp32._packed is None  # fp32 weights: MKL's product, nothing to pack
    with torch.no_grad():
        layer.eval()(x)
    assert layer._packed is None  # no block: the plain product
    with packing(layer):
        layer(x)
        assert layer._packed is not None
        layer.train()
        assert layer._packed is None  # going back to training frees the copy


def test_a_changed_weight_is_packed_again():
    layer = _layer()
    x = torch.randn(4, 96).to(torch.bfloat16)
    with packing(layer):
        before = layer(x)
        layer.weight.mul_(2)  # in place: a new version
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not torch.equal(layer(x), before)
        layer.weight.data = torch.randn_like(layer.weight)  # new storage
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.load_state_dict({"weight": torch.zeros(200, 96), "bias": torch.zeros(200)})
        assert torch.equal(layer(x), torch.zeros(4, 200, dtype=torch.bfloat16))


def test_inference_mode_packs_and_moving_the_layer_drops_the_copy():
    layer = _layer()
    x = torch.randn(3, 96).to(torch.bfloat16)
    with torch.inference_mode(), prepacked_weights(layer):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is not None
        layer.float()  # a new weight (dtype or device): the old packed copy must not outlive it
        assert layer._packed is None
    with packing(layer):
        layer(x.float())
        assert layer._packed is None  # fp32 now: nothing to pack


def test_copies_and_pickles_carry_no_packed_copy():
    layer = _layer()
    x = torch.randn(2, 96).to(torch.bfloat16)
    with packing(layer):
        expected = layer(x)
        clones = (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)))
    for clone in clones:
        assert clone._packed is None and clone._blocks == 0
        with packing(clone):
            assert torch.equal(clone(x), expected)


@pytest.fixture(params=["dense", "moe"])
def bf16_model_dir(request, tmp_path):
    config = dict(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=512)
    hf = (
        random_hf_model(HFDense, tiny_dense_config(**config))
        if request.param == "dense"
        else random_hf_moe(tiny_moe_config(**config, moe_intermediate_size=64))
    )
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_model_logits_and_greedy_tokens_are_bitwise_those_without_packing(bf16_model_dir):
    model = ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16)
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with packing(model):
        packed_logits = model(ids).logits
        packed_tokens = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[])
        linears = sum(1 for m in model.modules() if isinstance(m, Linear))
        assert _packed_count(model) == linears > 0  # every projection and the head took the packed path
    set_prepacking(model, False)
    with packing(model):  # switched off: the plain products, even inside a block
        assert torch.equal(model(ids).logits, packed_logits)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[]), packed_tokens)
        assert _packed_count(model) == 0


def test_the_backend_switch_turns_packing_off(bf16_model_dir):
    model = ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16, backend=BackendConfig(prepack_cpu_inference=False))
    with packing(model):
        model(torch.tensor([[5, 6, 7]]))
        assert _packed_count(model) == 0


def test_training_after_inference_uses_the_updated_weights(bf16_model_dir):
    """eval -> train -> step -> eval, all inside one open block: the second inference sees the
    stepped weights (train() drops the copies, the step's in-place updates change the version)."""
    model = ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with prepacked_weights(model):
        with torch.no_grad():
            before = model(ids).logits
        assert _packed_count(model) > 0
        model.train()
        assert _packed_count(model) == 0
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(p.grad.sign() * 1e-2)
        model.eval()
        with torch.no_grad():
            after = model(ids).logits
    set_prepacking(model, False)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.equal(after, before)
    assert torch.equal(after, plain)


def test_lora_layers_pack_their_base_and_merge_keeps_packing(bf16_model_dir):
    from ernie45.peft import PeftConfig, merge

    peft = PeftConfig(target_modules=["*.self_attn.*_proj"], dim=4, alpha=8, lora_dtype=torch.bfloat16)
    model = ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16, peft=peft)
    for p in model.parameters():  # non-zero adapters, so the update is in the logits
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with packing(model):
        packed = model(ids).logits
        assert _packed_count(model) == sum(1 for m in model.modules() if isinstance(m, Linear))
    set_prepacking(model, False)
    with packing(model):
        assert torch.equal(model(ids).logits, packed)
    set_prepacking(model, True)
    merged = merge(model)
    with packing(merged):
        merged(ids)
        assert _packed_count(merged) == sum(1 for m in merged.modules() if isinstance(m, Linear)) > 0


def test_generate_packs_for_its_duration_and_an_outer_block_keeps_the_copies(bf16_model_dir):
    model = ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16)
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids)
    assert _packed_count(model) == 0  # a plain forward: no block, no copy
    stream = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[])
    assert _packed_count(model) == 0  # generate's block ended with it
    with prepacked_weights(model):  # a serving loop: one block around many calls
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[]), stream)
        copies = {id(m._packed) for m in model.modules() if isinstance(m, Linear)}
        assert _packed_count(model) > 0
        model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[])
        assert {id(m._packed) for m in model.modules() if isinstance(m, Linear)} == copies  # reused
    assert _packed_count(model) == 0


def test_writes_through_data_between_blocks_are_seen():
    """``.data`` writes leave the version unchanged (EMA updates, PEFT's merge): every block packs
    afresh, so the next block sees them."""
    layer = _layer()
    x = torch.randn(5, 96).to(torch.bfloat16)
    with packing(layer):
        layer(x)
    edits = (
        lambda w: w.data.mul_(0.5),
        lambda w: w.data[3].add_(1.0),  # one row
        lambda w: w.data[[0, 1]].copy_(w.data[[1, 0]].clone()),  # two rows swapped
    )
    for edit in edits:
        version = layer.weight._version
        edit(layer.weight)
        assert layer.weight._version == version  # invisible to the version check
        with packing(layer):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_hf_peft_merge_on_our_model_is_seen_by_generate(bf16_model_dir):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(ernie45.from_pretrained(bf16_model_dir, dtype=torch.bfloat16), config).eval()
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    with packing(model):
        adapted = model(ids).logits
    merged = model.merge_and_unload()  # writes the base weights through .data
    with packing(merged):
        got = merged(ids).logits
    set_prepacking(merged, False)
    with torch.no_grad():
        plain = merged(ids).logits
    assert torch.equal(got, plain)
    assert (got.float() - adapted.float()).abs().max() < 0.1 * adapted.float().abs().max()


def test_compiled_code_traces_the_plain_product():
    """Under torch.compile the layer is one F.linear (no data-dependent cache in the graph)."""
    layer = _layer()
    x = torch.randn(4, 96).to(torch.bfloat16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with packing(layer):  # even inside a block
        assert torch.equal(compiled(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None
