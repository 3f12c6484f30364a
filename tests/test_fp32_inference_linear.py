"""fp32 CPU inference of a few rows through oneDNN (models/linear.py): inside a ``prepacked_weights``
block a call of at most ``FP32_ONEDNN_MAX_ROWS`` rows multiplies by the layer's own weight in
oneDNN (no copy), equal to ``F.linear`` within fp32 rounding; everything else is ``F.linear`` itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile
from transformers import Ernie4_5ForCausalLM as HFDense

import ernie45
from ernie45.models.linear import FP32_ONEDNN_MAX_ROWS, Linear, onednn_available, prepacked_weights, set_prepacking

from builders import random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN: the layer is F.linear")


def _layer(bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 200, bias=bias).eval()


def _run(module, *args, block: bool = True):
    """(module(*args) without autograd, inside a block or not; whether oneDNN's linear ran)."""
    with torch.no_grad(), profile() as prof:
        if block:
            with prepacked_weights(module):
                out = module(*args)
        else:
            out = module(*args)
    return out, any("_linear_pointwise" in event.name for event in prof.events())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (4, 96), (2, 3, 96), (FP32_ONEDNN_MAX_ROWS, 96)])
def test_a_few_fp32_rows_go_to_onednn_with_the_plain_weight(bias, shape):
    layer = _layer(bias)
    x = torch.randn(shape)
    got, onednn = _run(layer, x)
    assert onednn and layer._packed is None  # nothing copied or kept
    assert got.shape == (*shape[:-1], 200)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(FP32_ONEDNN_MAX_ROWS + 1, 96), (3, 20, 96), (0, 96)])
def test_more_rows_or_no_rows_are_f_linear_itself(shape):
    layer = _layer()
    x = torch.randn(shape)
    got, onednn = _run(layer, x)
    assert not onednn
    assert torch.equal(got, F.linear(x, layer.weight, layer.bias))


def test_outside_a_block_with_autograd_strided_or_switched_off_it_is_f_linear():
    layer = _layer()
    x = torch.randn(2, 96)
    assert not _run(layer, x, block=False)[1]
    assert not _run(layer, torch.randn(96, 2).T)[1]  # strided input
    with prepacked_weights(layer):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # autograd on: the weight wants a gradient
    set_prepacking(layer, False)
    got, onednn = _run(layer, x)
    assert not onednn and torch.equal(got, F.linear(x, layer.weight, layer.bias))


def test_a_weight_changed_through_data_is_the_one_used():
    layer = _layer()
    x = torch.randn(1, 96)
    with torch.no_grad(), prepacked_weights(layer):
        before = layer(x)
        layer.weight.data.mul_(2)  # NOTE: no version bump: the plain weight is read on every call
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_fp32_generation_matches_transformers_and_the_plain_products(tmp_path, kind):
    """A generate call runs its decode steps through oneDNN: greedy tokens are transformers', and
    the decode logits those of the plain products within fp32 rounding."""
    config = dict(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=512)
    hf = (
        random_hf_model(HFDense, tiny_dense_config(**config))
        if kind == "dense"
        else random_hf_moe(tiny_moe_config(**config, moe_intermediate_size=64))
    )
    hf.save_pretrained(tmp_path)
    model = ernie45.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with profile() as prof:
            ours = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[], output_scores=True, return_dict_in_generate=True)
        assert any("_linear_pointwise" in event.name for event in prof.events())
        theirs = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        set_prepacking(model, False)
        plain = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[], output_scores=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs)
    assert torch.equal(ours.sequences, plain.sequences)
    for step, (got, want) in enumerate(zip(ours.scores, plain.scores)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"decode step {step}")
