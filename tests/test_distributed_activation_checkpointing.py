"""Activation checkpointing per block: the recompute replays the forward's routing and leaves
the forward's load statistics alone (single process; the multi-rank layouts are in test_distributed_ep)."""

from __future__ import annotations

import copy

import torch

from builders import moe_model, token_batch
from dist_checks import assert_grads_close
from ernie45.distributed import apply_activation_checkpointing


def test_recompute_replays_routing_even_if_the_router_state_changed():
    reference = moe_model()
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model)
    batch = token_batch(reference.config.vocab_size, 2, 12)
    reference(batch, labels=batch).loss.backward()
    loss = model(batch, labels=batch).loss
    load = [layer.last_record.tokens_per_expert.clone() for layer in model.moe_layers()]
    with torch.no_grad():  # a recompute that re-ran top-k would now send every token to expert 3
        for layer in model.moe_layers():
            layer.moe_statics.e_score_correction_bias[0, 3] += 100.0
    loss.backward()
    assert_grads_close(model, reference, "grads after a replayed recompute")
    for layer, before in zip(model.moe_layers(), load):
        assert torch.equal(layer.last_record.tokens_per_expert, before)  # not overwritten by the recompute
        assert before[3] < batch.numel()
