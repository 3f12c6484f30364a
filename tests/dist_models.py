"""Tiny models, batches and comparisons shared by the multi-process tests (fp32, same on every rank)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from transformers import Ernie4_5_MoeConfig

from conftest import perturb_norms_and_biases, tiny_dense_config
from ernie45 import Ernie4_5ForCausalLM
from ernie45.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM

ATOL = 1e-5


def dense_model(seed: int = 0, **overrides) -> Ernie4_5ForCausalLM:
    """A random fp32 dense model, identical on every rank that asks with the same seed."""
    torch.manual_seed(seed)
    model = Ernie4_5ForCausalLM.from_config(tiny_dense_config(**overrides), dtype=torch.float32)
    perturb_norms_and_biases(model)
    return model


def tiny_moe_config(**overrides) -> Ernie4_5_MoeConfig:
    """Layer 0 dense, layers 1-2 MoE: 8 experts, top-2, one shared expert."""
    values = dict(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, moe_intermediate_size=16,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=-1,
        moe_layer_interval=1, tie_word_embeddings=True, use_bias=False,
    )
    values.update(overrides)
    return Ernie4_5_MoeConfig(**values)


@torch.no_grad()
def make_routing_matter(model: torch.nn.Module, favourite_experts: tuple[int, ...] = (), bias: float = 10.0) -> None:
    """Input-dependent routing (router std 0.3, experts std 0.1, small random correction bias);
    a large ``bias`` on ``favourite_experts`` sends (nearly) every token to them."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("mlp.gate.weight"):
            tensor.normal_(0.0, 0.3)
        elif name.endswith("e_score_correction_bias"):
            tensor.normal_(0.0, 0.01)
            tensor[0, list(favourite_experts)] += bias
        elif ".experts." in name:
            tensor.normal_(0.0, 0.1)


def moe_model(seed: int = 0, favourite_experts: tuple[int, ...] = (), **overrides) -> Ernie4_5_MoeForCausalLM:
    """A random fp32 MoE model, identical on every rank that asks with the same arguments."""
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config(**overrides), dtype=torch.float32)
    perturb_norms_and_biases(model)
    make_routing_matter(model, favourite_experts)
    return model


def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor, on every rank."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (full(a).detach().float() - full(b).detach().float()).abs().max().item() if a.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Compare in fp32 within ``ATOL`` (no relative slack); returns the max abs difference."""
    diff = max_diff(actual, expected)
    assert full(actual).shape == expected.shape, f"{what}: shape {full(actual).shape} != {expected.shape}"
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"
    return diff


def assert_grads_close(model: torch.nn.Module, reference: torch.nn.Module, what: str) -> float:
    """Every parameter's gradient against the single-process model's; returns the worst difference."""
    expected = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{what}: {name} has no gradient"
        worst = max(worst, assert_close(param.grad, expected[name].grad, f"{what}: grad of {name}"))
    return worst


def assert_params_close(model: torch.nn.Module, reference: torch.nn.Module, what: str) -> float:
    expected = dict(reference.named_parameters())
    return max(assert_close(p, expected[name], f"{what}: {name}") for name, p in model.named_parameters())
