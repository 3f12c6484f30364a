"""FSDP2 on 2 gloo ranks: AdamW steps, gradient accumulation, activation checkpointing and the fused
loss (tied and untied heads) equal the single-process model on the same global batch (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from builders import dense_model, moe_model, token_batch
from dist_checks import assert_close, assert_grads_close, assert_params_close, full
from dist_harness import run_ranks
from ernie45.distributed import (
    ParallelConfig,
    parallelize_model,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
)
from ernie45.models.linear import Linear, prepacked_weights
from ernie45.training.loss import FusedLinearCrossEntropy, count_label_tokens

# NOTE: every test here forks gloo ranks.
pytestmark = pytest.mark.multiprocess

FP32 = dict(param_dtype=torch.float32)


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    # NOTE: Adam divides by |g| + eps, so a gradient entry near fp32 round-off (|g| ~ 1e-8 here)
    # turns the reduction-order noise every data-parallel sum has into lr/eps times more in the
    # update; eps=1e-6 keeps that amplification below the 1e-5 tolerance.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)


def _local_rows(batch: torch.Tensor) -> torch.Tensor:
    return batch.chunk(dist.get_world_size())[dist.get_rank()]


def _train_steps(rank: int, world: int, tied: bool, layout: dict) -> None:
    reference = dense_model(tie_word_embeddings=tied)
    model = copy.deepcopy(reference)
    parallelize_model(model, ParallelConfig(**layout, **FP32))
    opt_ref, opt = _adamw(reference), _adamw(model)
    for step in range(3):
        batch = token_batch(reference.config.vocab_size, 2 * world, 12, seed=step)
        out_ref = reference(batch, labels=batch)
        out = model(_local_rows(batch), labels=_local_rows(batch))
        assert_close(out.logits, _local_rows(out_ref.logits), f"step {step} logits")
        out_ref.loss.backward()
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        assert_close(loss, out_ref.loss, f"step {step} loss")
        grads = assert_grads_close(model, reference, f"step {step}")
        for optimizer in (opt_ref, opt):
            optimizer.step()
            optimizer.zero_grad()
        params = assert_params_close(model, reference, f"after step {step}")
        if rank == 0:
            print(f"{layout} tied={tied} step {step}: grads {grads:.2e} params {params:.2e}")


def test_fsdp2_adamw_steps_equal_single_process():
    run_ranks(_train_steps, 2, True, dict(dp_shard=2))
    run_ranks(_train_steps, 2, False, dict(dp_shard=2, activation_checkpointing=True))


def test_hsdp_adamw_steps_equal_single_process():
    run_ranks(_train_steps, 4, True, dict(dp_replicate=2, dp_shard=2))


def _fused_loss_steps(rank: int, world: int, tied: bool) -> None:
    """The recipe's fused linear + cross-entropy under FSDP2: the model computes no logits (its
    head is never called; untied, it is an FSDP unit of its own), the loss gathers the head."""
    reference = dense_model(tie_word_embeddings=tied)
    model = copy.deepcopy(reference)
    parallelize_model(model, ParallelConfig(dp_shard=world, **FP32))
    loss_fn = FusedLinearCrossEntropy(chunk_size=5)
    opt_ref, opt = _adamw(reference), _adamw(model)
    for step in range(2):
        ids = token_batch(reference.config.vocab_size, 2 * world, 12, seed=step)
        for net, rows, optimizer in ((reference, ids, opt_ref), (model, _local_rows(ids), opt)):
            batch = dict(input_ids=rows, labels=rows, attention_mask=None, padding_mask=None)
            loss, _ = loss_fn(net, batch)
            (loss / count_label_tokens(rows)).backward()
        assert_grads_close(model, reference, f"tied={tied} step {step}")
        for optimizer in (opt_ref, opt):
            optimizer.step()
            optimizer.zero_grad()
        assert_params_close(model, reference, f"tied={tied} after step {step}")


def test_fused_loss_under_fsdp2_equals_single_process():
    run_ranks(_fused_loss_steps, 2, False)
    run_ranks(_fused_loss_steps, 2, True)


def _grad_accumulation(rank: int, world: int, moe: bool) -> None:
    reference = moe_model() if moe else dense_model()
    model = copy.deepcopy(reference)
    parallelize_model(model, ParallelConfig(dp_shard=world, ep=2 if moe else 1, **FP32))
    batch = token_batch(reference.config.vocab_size, 4 * world, 8)
    reference(batch, labels=batch).loss.backward()

    reduce_scatters = []
    original = dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *a, **k: reduce_scatters.append(1) or original(*a, **k)
    first, second = _local_rows(batch).chunk(2)
    prepare_for_grad_accumulation(model)
    (model(first, labels=first).loss / 2).backward()
    assert not reduce_scatters, "a reduce-scatter ran during an accumulation micro-batch"
    assert all(p.grad is None for p in model.parameters()), "sharded gradients appeared before the last micro-batch"
    prepare_for_final_backward(model)
    (model(second, labels=second).loss / 2).backward()
    dist.reduce_scatter_single = original
    assert reduce_scatters, "the final micro-batch did not reduce-scatter"
    assert_grads_close(model, reference, "accumulated grads")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-ep2"])
def test_fsdp2_grad_accumulation_defers_reduce_scatter(moe):
    run_ranks(_grad_accumulation, 2, moe)


def _mixed_precision(rank: int, world: int) -> None:
    """bf16 compute with fp32 master weights: the close to the fp32 model; the router group is
    exercised by the MoE tests. Here: parameters stay fp32, gradients arrive fp32."""
    reference = dense_model()
    model = copy.deepcopy(reference)
    parallelize_model(model, ParallelConfig(dp_shard=world))  # default: bf16 params, fp32 reduce
    batch = token_batch(reference.config.vocab_size, 2 * world, 8)
    out = model(_local_rows(batch), labels=_local_rows(batch))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
    ref_logits = _local_rows(reference(batch).logits)
    assert (full(out.logits).float() - ref_logits).abs().max() < 5e-2
    with torch.no_grad(), prepacked_weights(model):  # bf16 inference on gathered weights: nothing packed
        model.eval()(_local_rows(batch))
        assert not [name for name, m in model.named_modules() if isinstance(m, Linear) and m._packed is not None]


def test_fsdp2_default_mixed_precision_keeps_fp32_master_weights():
    run_ranks(_mixed_precision, 2)
