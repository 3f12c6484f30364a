"""Packed rows (several documents in one row, positions restarting at 0): each document is attended
on its own, so a packed forward equals separate forwards, for every kernel, dense and MoE, and
equals transformers' padding-free path (``DataCollatorWithFlattening``'s layout)."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5ForCausalLM as HFDense

import ernie45
from ernie45 import BackendConfig
from ernie45.models.attention import build_attention_mask, document_attention, document_ids, document_runs, packed_cu_seqlens

from builders import random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config

LENGTHS = (5, 3, 7)  # three documents in one row


def documents(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]


def packed(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [1,S], position_ids [1,S]) with positions restarting per document."""
    return torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None]


def load(kind: str, tmp_path, attn: str = "sdpa"):
    hf = random_hf_model(HFDense, tiny_dense_config()) if kind == "dense" else random_hf_moe(tiny_moe_config())
    hf.save_pretrained(tmp_path)
    return hf.eval(), ernie45.from_pretrained(tmp_path, backend=BackendConfig(attn=attn))


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex"])
def test_packed_logits_equal_separate_forwards(kind, attn, tmp_path):
    _, model = load(kind, tmp_path, attn)
    docs = documents(model.config.vocab_size)
    ids, positions = packed(docs)
    with torch.no_grad():
        got = model(ids, position_ids=positions).logits[0]
        expected = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_packed_gradients_equal_separate_forwards(kind, tmp_path):
    _, model = load(kind, tmp_path)
    docs = documents(model.config.vocab_size, seed=1)
    ids, positions = packed(docs)
    model.zero_grad()
    logits = model(ids, position_ids=positions).logits[0]
    starts = torch.tensor((0,) + LENGTHS).cumsum(0)
    loss = sum(logits[a:b].float().logsumexp(-1).sum() for a, b in zip(starts[:-1], starts[1:]))
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(model(d[None]).logits[0].float().logsumexp(-1).sum() for d in docs).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_document_never_sees_another(kind, tmp_path):
    _, model = load(kind, tmp_path)
    docs = documents(model.config.vocab_size, seed=2)
    ids, positions = packed(docs)
    changed = [docs[0], torch.flip(docs[1], [0]) + 0, docs[2]]
    changed[1][0] = (changed[1][0] + 1) % model.config.vocab_size
    with torch.no_grad():
        before = model(ids, position_ids=positions).logits[0]
        after = model(packed(changed)[0], position_ids=positions).logits[0]
    first, third = slice(0, LENGTHS[0]), slice(LENGTHS[0] + LENGTHS[1], None)
    # NOTE: MoE expert GEMMs see other row counts when a document changes, which moves the last bit.
    tolerance = dict(rtol=0, atol=0) if kind == "dense" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(before[first], after[first], **tolerance)
    torch.testing.assert_close(before[third], after[third], **tolerance)
    assert not torch.equal(before[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]], after[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]])


def test_transformers_padding_free_layout_gives_transformers_logits(tmp_path):
    hf, model = load("dense", tmp_path)
    ids, positions = packed(documents(model.config.vocab_size, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, position_ids=positions).logits,
            hf(ids, position_ids=positions, use_cache=False).logits,  # transformers packs only without a cache
            rtol=1e-5,
            atol=1e-5,
        )


def test_padding_after_the_last_document_is_masked_and_skips_the_experts(tmp_path):
    _, model = load("moe", tmp_path)
    docs = documents(model.config.vocab_size, seed=4)
    ids, positions = packed(docs)
    ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    positions = torch.cat([positions, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, sum(LENGTHS)), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        got = model(ids, position_ids=positions, attention_mask=mask).logits[0, : sum(LENGTHS)]
        loads = sum(layer.last_record.tokens_per_expert.sum() for layer in model.moe_layers())
        expected = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert loads == sum(LENGTHS) * model.moe_config.n_activated_experts * len(model.moe_layers())  # no padding


def test_a_short_rows_tail_padding_is_no_document_and_gets_zeros():
    """Two packed rows, the second short and padded to the first's length: the documents are regrouped
    to the longest real one (the padding would have made them all that long), real positions attend as
    the dense mask lets them, and padded positions get zero attention output, with finite gradients."""
    torch.manual_seed(0)
    heads, hd = 4, 8
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0]])
    keep = torch.tensor([[True] * 12, [True] * 5 + [False] * 7])
    runs = document_runs(document_ids(positions), keep)
    assert runs.gather.shape == (5, 5)  # 3 + 2 documents of real tokens, the longest 5 (not the 7 of padding)
    q, k, v = (torch.randn(2, heads, 12, hd, requires_grad=True) for _ in range(3))
    got = document_attention(q, k, v, runs, scale=hd**-0.5, gqa=False)
    mask = build_attention_mask(keep, 12, document_ids(positions))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
    real = keep[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)
    assert bool((got[~real] == 0).all())
    grads = {}
    for name, out in (("packed", got), ("dense", expected)):
        grads[name] = torch.autograd.grad((out * real).sum(), (q, k, v))  # the loss sees real tokens only
    for mine, theirs in zip(grads["packed"], grads["dense"]):
        assert bool(mine.isfinite().all())
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_document_ids_and_cu_seqlens():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_ids(positions).tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    assert document_ids(torch.arange(6)[None].expand(2, -1)) is None  # ordinary rows keep the fast path
    cu, longest = packed_cu_seqlens(positions)
    assert cu.tolist() == [0, 3, 5, 6, 12] and cu.dtype == torch.int32 and longest == 6
