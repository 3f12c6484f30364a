"""Gradients held in bf16 where they are bf16 values (``ernie45.training.compact_grads``): the clipped
gradient norm and every weight after the optimizer steps are bitwise those of fp32 gradients, with
one micro-batch or several; the gradients bf16 cannot hold stay fp32; the trainer uses it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from builders import dense_model, moe_model, token_batch

from ernie45.training.compact_grads import CompactGradients
from ernie45.training.config import load_recipe, parse_overrides
from ernie45.training.optim import clip_grad_norm
from ernie45.training.recipe import Trainer
from ernie45.training.runtime import StopSignals, init_runtime


def train(model, batches: list[list[torch.Tensor]], compact: bool, max_norm: float) -> tuple[list[float], CompactGradients | None]:
    """Optimizer steps of ``model`` (bf16 autocast, fused AdamW), one per list of micro-batches:
    (the gradient norms before clipping, the CompactGradients used)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    held = CompactGradients(params, torch.bfloat16) if compact else None
    norms = []
    for micro_batches in batches:
        for ids in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss / len(micro_batches)
            loss.backward()
        norms.append(clip_grad_norm(params, max_norm, compact=held))
        if held is not None:
            held.step(optimizer)
            held.clear()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms, held


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
@pytest.mark.parametrize("kind", ["dense-tied", "dense-untied", "moe"])
def test_training_is_bitwise_the_same_with_fp32_gradients(kind, micro_batches):
    model = moe_model() if kind == "moe" else dense_model(tie_word_embeddings=kind == "dense-tied")
    twin = copy.deepcopy(model)
    vocab = model.config.vocab_size
    batches = [[token_batch(vocab, 2, 12, seed=10 * s + m) for m in range(micro_batches)] for s in range(3)]
    expected, _ = train(model, batches, compact=False, max_norm=0.5)
    norms, held = train(twin, batches, compact=True, max_norm=0.5)
    assert norms == expected and max(norms) > 0.5  # the same norms, and clipping did scale
    for (name, got), want in zip(twin.named_parameters(), model.parameters()):
        assert torch.equal(got, want), name
    names = {id(p): n for n, p in twin.named_parameters()}
    compact = {names[key] for key, exact in held.exact.items() if exact}
    kept_fp32 = {names[key] for key, exact in held.exact.items() if not exact}
    assert "model.layers.0.self_attn.q_proj.weight" in compact and "model.layers.0.mlp.down_proj.weight" in compact
    assert "model.embed_tokens.weight" in kept_fp32 and "model.norm.weight" in kept_fp32  # not bf16 values
    if kind == "moe":
        assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= kept_fp32  # fp32 products


def test_held_gradients_are_bf16_until_the_step_and_are_gone_after_it():
    model = dense_model()
    params = list(model.parameters())
    held = CompactGradients(params, torch.bfloat16)
    ids = token_batch(model.config.vocab_size, 2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is None and held.held[id(q_proj)].dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.grad.dtype == torch.float32
    held.step(torch.optim.AdamW(params, lr=1e-3))
    assert not held.has_gradients() and all(p.grad is None for p in params if id(p) in held.exact and held.exact[id(p)])


def trainer(tmp_path: Path, name: str, *overrides: str) -> Trainer:
    config = load_recipe(None, parse_overrides([f"--output_dir={tmp_path / name}", "--model.torch_dtype=bfloat16", *overrides]))
    with StopSignals() as signals:
        return Trainer(config, init_runtime(config.dist_env), Path(config.output_dir), signals)


@pytest.mark.parametrize("local_batch_size", [16, 8])  # one micro-batch a step, and two
def test_the_trainer_holds_bf16_gradients_and_trains_as_with_fp32_ones(tmp_path, local_batch_size):
    overrides = (f"--step_scheduler.local_batch_size={local_batch_size}", "--clip_grad_norm.max_norm=0.05")
    compact, plain = trainer(tmp_path, "compact", *overrides), trainer(tmp_path, "plain", *overrides)
    assert compact.compact is not None
    plain.compact.remove()
    plain.compact = None
    for step in range(3):
        got, want = compact.train_step(step)[0], plain.train_step(step)[0]
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]) and got["grad_norm"] > 0.05
    for (name, got), want in zip(compact.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(got, want), name
    assert any(compact.compact.exact.values())


def test_fp32_training_keeps_plain_gradients(tmp_path):
    config = load_recipe(None, parse_overrides([f"--output_dir={tmp_path / 'run'}"]))
    assert config.model.torch_dtype == "float32"
    with StopSignals() as signals:
        assert Trainer(config, init_runtime(config.dist_env), Path(config.output_dir), signals).compact is None
