"""Comparisons shared by the multi-process tests: fp32, within an absolute tolerance, on sharded tensors;
the bytes a rank reads from safetensors files; saved checkpoints compared file by file.

The tiny models and batches they compare are built by builders.py.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from ernie45.checkpoint.safetensors_io import CheckpointFiles

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


def count_reads(log: list[int]) -> None:
    """Record the bytes of every tensor (part) this process reads from safetensors files."""
    for name in ("get", "get_slice"):
        original = getattr(CheckpointFiles, name)

        def counted(self, *args, _original=original):
            tensor = _original(self, *args)
            log.append(tensor.numel() * tensor.element_size())
            return tensor

        setattr(CheckpointFiles, name, counted)
    read_rows_into = CheckpointFiles.read_rows_into

    def counted_rows(self, key, out, start=0):
        log.append(out.numel() * out.element_size())
        read_rows_into(self, key, out, start)

    CheckpointFiles.read_rows_into = counted_rows


def same_files(directory, single) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((single / "model.safetensors.index.json").read_text())["weight_map"]
    for name in sorted(set(index.values())):
        ours, theirs = load_file(directory / name), load_file(single / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def reloads_bit_exactly(directory, original: torch.nn.Module) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    expected = original.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected if not torch.equal(got[k], expected[k])]
