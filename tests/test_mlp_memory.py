"""The feed-forward's down projection with the SwiGLU in its backward (models/mlp.py): the same bits
as the unfused layers, in fp32 and under bf16 autocast, without keeping the [tokens, intermediate]
SwiGLU output for backward; and where the down projection is hooked, wrapped or not training, the
unfused layers run as called.
"""

from __future__ import annotations

import pytest
import torch

from ernie45.models import mlp as mlp_module
from ernie45.models.mlp import Ernie4_5MLP
from ernie45.peft.lora import LoRALinear

HIDDEN, INTER = 64, 96


def _unfused(monkeypatch) -> None:
    """The reference: the down projection called as a module on the SwiGLU output."""
    monkeypatch.setattr(mlp_module, "_runs_as_plain_linear", lambda down, gate: False)


def _step(mlp: Ernie4_5MLP, x: torch.Tensor, grad: torch.Tensor, autocast: bool):
    """(output, [input grad, parameter grads], shapes autograd saved) of one forward and backward."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = mlp(x)
    out.backward(grad.to(out.dtype))
    return out, [x.grad] + [p.grad for p in mlp.parameters()], saved


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, HIDDEN), (9, HIDDEN)])
def test_the_mlp_is_bitwise_unfused_and_keeps_no_swiglu_output(monkeypatch, autocast, bias, shape):
    torch.manual_seed(0)
    mlp = Ernie4_5MLP(HIDDEN, INTER, bias=bias)
    x, grad = torch.randn(shape), torch.randn(shape)
    ours, our_grads, our_saved = _step(mlp, x, grad, autocast)
    _unfused(monkeypatch)
    reference, reference_grads, reference_saved = _step(mlp, x, grad, autocast)
    assert ours.dtype == reference.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(ours, reference)
    assert len(our_grads) == len(reference_grads) == 1 + 3 * (1 + bias)
    for got, expected in zip(our_grads, reference_grads):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    intermediate = [s for s in our_saved if s[-1] == INTER and s.numel() == x.numel() // HIDDEN * INTER]
    reference_intermediate = [s for s in reference_saved if s[-1] == INTER and s.numel() == x.numel() // HIDDEN * INTER]
    assert (len(intermediate), len(reference_intermediate)) == (2, 3)  # gate and up; the unfused add the SwiGLU output


def test_a_hooked_wrapped_or_inference_down_projection_runs_as_called():
    torch.manual_seed(0)
    mlp = Ernie4_5MLP(HIDDEN, INTER)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    seen = []
    handle = mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    mlp(x).sum().backward()
    assert seen == [torch.Size([5, INTER])]  # the hook saw the SwiGLU output it asks for
    handle.remove()
    assert mlp_module._runs_as_plain_linear(mlp.down_proj, mlp.gate_proj(x))
    with torch.no_grad():
        assert not mlp_module._runs_as_plain_linear(mlp.down_proj, mlp.gate_proj(x))
    mlp.down_proj = LoRALinear(mlp.down_proj, rank=2, scale=1.0)  # a subclass: a forward of its own
    assert not mlp_module._runs_as_plain_linear(mlp.down_proj, mlp.gate_proj(x))
    mlp(x).sum().backward()
    assert mlp.down_proj.lora_A.weight.grad is not None
