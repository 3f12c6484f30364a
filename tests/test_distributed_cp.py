"""Context parallelism on gloo ranks: a sequence split over cp ranks (zigzag) gives the logits and
gradients of the whole sequence in one process, dense and MoE, with padding and packed documents,
alone and with expert parallelism and FSDP2; plus the sharding arithmetic itself."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from builders import dense_model, moe_model, token_batch
from dist_checks import assert_close, assert_grads_close
from dist_harness import run_ranks
from ernie45.distributed import ParallelConfig, gather_sequence, parallelize_model, shard_sequence
from ernie45.distributed.context_parallel import gathered_index, zigzag_index

LONG = dict(max_position_embeddings=2048)


def test_zigzag_gives_every_rank_an_early_and_a_late_chunk():
    assert zigzag_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(gathered_index(24, 3).tolist()) == list(range(24))


def test_shard_masks_are_causal_by_global_index_and_respect_padding_and_documents():
    ids = torch.arange(10)[None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])  # two packed documents
    mask = torch.tensor([[1] * 9 + [0]])  # the last token is padding
    labels = ids.clone()
    shard = shard_sequence(ids, 1, 2, attention_mask=mask, position_ids=positions, labels=labels)
    length = 12  # padded to a multiple of 2 x cp
    assert shard.index.tolist() == [3, 4, 5, 6, 7, 8]
    keys = gathered_index(length, 2)
    visible = shard.attention_mask[0, 0]
    for q, gq in enumerate(shard.index.tolist()):
        doc_q = 0 if gq < 4 else 1
        for k, gk in enumerate(keys.tolist()):
            doc_k = 0 if gk < 4 else 1
            expected = gk == gq or (gk <= gq and gk < 9 and doc_k == doc_q)
            assert bool(visible[q, k]) == expected, (gq, gk)
    assert shard.position_ids[0].tolist() == [3, 0, 1, 2, 3, 4]
    # token 3 ends document 0: it predicts nothing; token 8 is the last real token
    assert shard.shift_labels[0].tolist() == [-100, 5, 6, 7, 8, -100]
    assert shard.padding_mask[0].tolist() == [False] * 6


def _reference(kind: str, ids, mask, positions, labels):
    model = dense_model(**LONG) if kind == "dense" else moe_model(favourite_experts=(1,), **LONG)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    # NOTE: normalised by the label tokens, as the recipe does (a sum over ~1,000 tokens has large grads)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()
    return model, logits.detach(), loss.detach()


def _cp_case(rank, world, kind, seq, cp, ep, packed, checkpointing=False):
    ids = token_batch(160, 2, seq, seed=seq)
    mask = torch.ones_like(ids)
    mask[1, seq - 7 :] = 0  # row 1 ends in padding
    positions = None
    labels = ids.masked_fill(mask == 0, -100)
    if packed:
        cut = seq // 3
        positions = torch.cat([torch.arange(cut), torch.arange(seq - cut)])[None].expand(2, -1)
        labels[:, cut] = -100  # the first token of a document is not predicted from the previous one
    reference, expected, expected_loss = _reference(kind, ids, mask, positions, labels)

    model = dense_model(**LONG) if kind == "dense" else moe_model(favourite_experts=(1,), **LONG)
    layout = ParallelConfig(cp=cp, ep=ep, param_dtype=None, activation_checkpointing=checkpointing)
    meshes = parallelize_model(model, layout)
    cp_group = meshes.cp.get_group()
    cp_rank = dist.get_rank(cp_group)
    shard = shard_sequence(ids, cp_rank, cp, attention_mask=mask, position_ids=positions, labels=labels)
    out = model(
        shard.input_ids, position_ids=shard.position_ids, attention_mask=shard.attention_mask,
        padding_mask=shard.padding_mask,
    )  # fmt: skip
    label_tokens = (labels[:, 1:] != -100).sum()
    local_loss = F.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), shard.shift_labels.reshape(-1), reduction="sum"
    ) / label_tokens
    # NOTE: FSDP2 averages gradients over its dp_shard x cp ranks; the reference loss is the cp ranks'
    # sum, and every dp_shard replica here sees the same batch.
    (local_loss * cp).backward()
    logits = gather_sequence(out.logits.detach(), shard, cp_group, seq)
    real = mask.bool()
    assert_close(logits[real], expected[real], f"{kind} cp={cp} ep={ep} logits")
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    assert_close(total, expected_loss, f"{kind} cp={cp} loss")
    assert_grads_close(model, reference, f"{kind} cp={cp} ep={ep} grads")


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("seq, cp", [(512, 2), (1000, 2), (1001, 4)])
def test_context_parallel_equals_one_process(kind, seq, cp):
    run_ranks(_cp_case, cp, kind, seq, cp, 1, False)


@pytest.mark.multiprocess
def test_context_parallel_keeps_packed_documents_apart():
    run_ranks(_cp_case, 2, "moe", 300, 2, 1, True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_context_parallel_with_expert_parallel_and_fsdp_on_four_ranks():
    # cp=2 x dp_shard=2 = 4 ranks, experts split over ep=2 folded onto them
    run_ranks(_cp_case, 4, "moe", 256, 2, 2, False)


@pytest.mark.multiprocess
def test_context_parallel_with_activation_checkpointing():
    # the recompute gathers K/V again and replays the MoE routing of the forward
    run_ranks(_cp_case, 2, "moe", 256, 2, 1, False, True)
