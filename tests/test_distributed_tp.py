"""Tensor parallelism (and TP x FSDP2) on gloo ranks: forward and backward equal the single-process
dense model in fp32; vocabulary-sharded logits work with a vocabulary-parallel loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from builders import dense_model, token_batch
from dist_checks import assert_close, assert_grads_close
from dist_harness import run_ranks
from ernie45.distributed import ParallelConfig, parallelize_model

# NOTE: every test here forks gloo ranks.
pytestmark = pytest.mark.multiprocess


def _tp_forward_backward(rank: int, world: int, overrides: dict) -> None:
    reference = dense_model(**overrides)
    model = copy.deepcopy(reference)
    parallel = ParallelConfig(tp=2, dp_shard=world // 2, param_dtype=torch.float32)
    parallelize_model(model, parallel)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj.weight, DTensor) and attn.q_proj.weight.placements[-1] == Shard(0)  # on tp
    if overrides.get("tie_word_embeddings", True):
        assert model.lm_head.weight is model.model.embed_tokens.weight

    batch = token_batch(reference.config.vocab_size, 2 * parallel.resolve(world).dp_shard, 10)
    rows = batch.chunk(world // 2)[rank // 2]  # tp peers see the same rows
    expected = reference(batch, labels=batch)
    out = model(rows, labels=rows)
    assert type(out.logits) is torch.Tensor  # full logits by default, not a DTensor
    logits = assert_close(out.logits, expected.logits.chunk(world // 2)[rank // 2], "logits")
    expected.loss.backward()
    out.loss.backward()
    grads = assert_grads_close(model, reference, "grads")
    if rank == 0:
        print(f"tp=2 x dp_shard={world // 2} {overrides}: logits {logits:.2e} grads {grads:.2e}")


def test_tp2_dense_forward_backward_equal_single_process():
    run_ranks(_tp_forward_backward, 2, {})
    run_ranks(_tp_forward_backward, 2, {"tie_word_embeddings": False, "use_bias": True})


def test_tp2_x_fsdp2_dense_forward_backward_equal_single_process():
    run_ranks(_tp_forward_backward, 4, {"use_bias": True})


def _vocab_parallel_loss(rank: int, world: int) -> None:
    reference = dense_model()
    model = copy.deepcopy(reference)
    parallelize_model(model, ParallelConfig(tp=world, param_dtype=torch.float32, sharded_logits=True))
    batch = token_batch(reference.config.vocab_size, 2, 10)
    expected = reference(batch, labels=batch)
    logits = model(batch).logits
    assert isinstance(logits, DTensor) and logits.to_local().shape[-1] == reference.config.vocab_size // world
    with loss_parallel():
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
    expected.loss.backward()
    assert_close(loss.full_tensor(), expected.loss, "vocab-parallel loss")
    assert_grads_close(model, reference, "vocab-parallel grads")
    dist.barrier()


def test_tp2_sharded_logits_with_loss_parallel():
    run_ranks(_vocab_parallel_loss, 2)
