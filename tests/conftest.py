"""Shared fixtures: tiny random ERNIE 4.5 models built with transformers and saved as real HF checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

# NOTE: tiny models are dominated by per-op overhead; one thread is faster and immune to a busy machine.
torch.set_num_threads(1)


def tiny_dense_config(**overrides) -> Ernie4_5Config:
    values = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_bias=False,
    )
    values.update(overrides)
    return Ernie4_5Config(**values)


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Move norm weights away from 1 and biases away from 0, so mistakes there show in logits."""
    for name, param in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            param.add_(torch.randn_like(param) * scale)


def random_hf_model(hf_class, config, seed: int = 0):
    torch.manual_seed(seed)
    model = hf_class(config).eval()
    perturb_norms_and_biases(model)
    return model


@pytest.fixture
def dense_checkpoint(tmp_path):
    """(directory, transformers model) for a tiny dense model saved by transformers."""
    model = random_hf_model(Ernie4_5ForCausalLM, tiny_dense_config())
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model
