"""Mixed precision (fp32 weights, bf16 autocast) without the weights' bf16 copies kept for backward
(models/linear.py): the same bits as ``F.linear`` under autocast, for the layer and for a whole
model's loss and gradients, and no saved tensor that is a low-precision copy of a weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Ernie4_5ForCausalLM as HFDense

import ernie45
from ernie45.models import linear as linear_module
from ernie45.models import mlp as mlp_module
from ernie45.models.linear import Linear
from ernie45.training.loss import FusedLinearCrossEntropy

from builders import perturb_norms_and_biases, random_hf_model, tiny_dense_config


def _saved_while(run) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd saves for backward while ``run()`` builds the graph."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, saved


def _f_linear(monkeypatch) -> None:
    """Make ``Linear`` call plain ``F.linear`` (autocast keeps its weight casts), the reference; the
    feed-forward then calls its down projection as a module too (no SwiGLU fused into it)."""
    monkeypatch.setattr(linear_module, "linear", F.linear)
    monkeypatch.setattr(mlp_module, "_runs_as_plain_linear", lambda down, gate: False)


@pytest.mark.parametrize("shape", [(2, 37, 64), (37, 64), (3, 5, 7, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_the_layer_is_bitwise_f_linear_under_autocast_and_saves_no_bf16_weight(monkeypatch, shape, bias, input_dtype):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias)
    x = torch.randn(*shape, dtype=input_dtype, requires_grad=True)
    grad = torch.randn(*shape[:-1], 96, dtype=torch.bfloat16)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, saved = _saved_while(lambda: layer(x))
        out.backward(grad)
        grads = (x.grad, layer.weight.grad, layer.bias.grad if bias else None)
        return out, grads, saved

    ours, our_grads, our_saved = run()
    _f_linear(monkeypatch)
    reference, reference_grads, reference_saved = run()
    assert ours.dtype == reference.dtype == torch.bfloat16
    assert torch.equal(ours, reference)
    for got, expected in zip(our_grads, reference_grads):
        assert (got is None and expected is None) or (got.dtype == expected.dtype and torch.equal(got, expected))
    copies = {((96, 64), torch.bfloat16), ((64, 96), torch.bfloat16)}  # autograd keeps the transposed view
    assert copies & set(reference_saved)  # what autograd keeps for F.linear: the check can see it
    assert not copies & set(our_saved) and ((96, 64), torch.float32) in our_saved


def test_outside_autocast_and_without_gradients_the_layer_is_plain_f_linear():
    torch.manual_seed(0)
    layer = Linear(64, 96)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    out, saved = _saved_while(lambda: layer(x.requires_grad_()))
    assert out.grad_fn.name() == "AddmmBackward0" and ((64, 96), torch.float32) in saved  # the weight's .T


def test_a_model_trained_under_autocast_gets_f_linear_s_loss_and_gradients_bitwise(tmp_path, monkeypatch):
    """The recipe's step (fused loss, fp32 master weights, bf16 autocast) on a small dense model."""
    hf = random_hf_model(HFDense, tiny_dense_config(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=512))
    perturb_norms_and_biases(hf)
    hf.save_pretrained(tmp_path)
    model = ernie45.from_pretrained(tmp_path, dtype=torch.float32).train()
    ids = torch.randint(3, 512, (2, 13), generator=torch.Generator().manual_seed(1))  # 26 tokens: no weight's shape
    batch = {"input_ids": ids, "attention_mask": None, "padding_mask": None, "labels": ids}

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (loss, _), saved = _saved_while(lambda: FusedLinearCrossEntropy()(model, batch))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, saved

    loss, grads, saved = step()
    _f_linear(monkeypatch)
    reference_loss, reference_grads, reference_saved = step()
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)
    low_precision_weights = {
        (shape, torch.bfloat16) for m in model.modules() if isinstance(m, Linear) for shape in (m.weight.shape, m.weight.T.shape)
    }
    assert low_precision_weights & set(reference_saved)
    assert not low_precision_weights & set(saved)


def test_layers_reading_one_fp32_input_share_its_one_bf16_cast(monkeypatch):
    """q/k/v read the norm's fp32 output: one bf16 copy of it is kept for backward, not three; a
    changed input (in place) or another input is cast afresh."""
    torch.manual_seed(0)
    layers = [Linear(64, n, bias=False) for n in (96, 32, 32)]
    x = torch.randn(2, 11, 64, requires_grad=True)

    def run(change_in_between: bool = False):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        x.grad = None
        storages = []

        def pack(tensor):
            if tensor.dtype == torch.bfloat16 and tensor.numel() == x.numel():  # F.linear saves it as [22, 64]
                storages.append(tensor.untyped_storage().data_ptr())
            return tensor

        source = x * 1.0
        outs = []
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for layer in layers:
                outs.append(layer(source))
                if change_in_between:
                    source.mul_(1.0)  # same values, new version: not the tensor that was cast
        sum(out.float().sum() for out in outs).backward()
        return [o.detach() for o in outs], [x.grad] + [layer.weight.grad for layer in layers], storages

    outs, grads, storages = run()
    assert len(storages) == 3 and len(set(storages)) == 1
    _, _, changed = run(change_in_between=True)
    assert len(set(changed)) == 3
    _f_linear(monkeypatch)
    reference_outs, reference_grads, reference_storages = run()
    assert len(set(reference_storages)) == 3  # autocast: a copy per layer
    assert all(torch.equal(a, b) for a, b in zip(outs + grads, reference_outs + reference_grads))


def test_compiled_training_under_autocast_traces_plain_f_linear():
    """Under torch.compile the layer is F.linear (the compiler decides what to keep), one graph."""
    torch.manual_seed(0)
    layer = Linear(64, 96)
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        reference = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(out, reference)
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
