"""Comparisons shared by the multi-process tests: fp32, within an absolute tolerance, on sharded tensors.

The tiny models and batches they compare are built by builders.py.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

ATOL = 1e-5


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
