"""Packing tokenized examples into rows: whole examples (best-fit decreasing) or cut across rows;
positions restart per document, no token is predicted from another document, and the loss of a
packed batch equals the unpacked one (same label tokens, same per-token losses)."""

from __future__ import annotations

import random

import pytest
import torch

from builders import dense_model
from ernie45.training.data import TokenizedExample, collate, pack_examples
from ernie45.training.loss import FusedLinearCrossEntropy, MaskedCrossEntropy, count_label_tokens


def examples(lengths, seed=0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 160) for _ in range(n)]
        prompt = rng.randrange(0, n)
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def test_whole_examples_fill_rows_and_keep_every_token():
    data = examples([7, 3, 9, 2, 5, 8, 1, 4])
    rows = pack_examples(data, 10)
    assert all(len(r.input_ids) <= 10 for r in rows)
    assert len(rows) == 4  # 39 tokens: best fit gives 10 + 10 + 10 + 9
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in data for t in e.input_ids)
    for row in rows:  # positions restart at 0 for each document, which starts without a label
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == -100 for i in starts)
    assert pack_examples(data, 10) == rows  # deterministic


def test_an_example_longer_than_a_row_is_an_error_unless_split():
    data = examples([4, 12, 3])
    with pytest.raises(ValueError, match="example 1 has 12 tokens.*split_across_pack"):
        pack_examples(data, 10)
    rows = pack_examples(data, 10, split_across_pack=True)
    assert [len(r.input_ids) for r in rows] == [10, 9]
    assert rows[1].position_ids[:2] == [6, 7]  # the piece keeps its example's positions
    with pytest.raises(ValueError, match="packed_sequence_size=0"):
        pack_examples(data, 0)


@pytest.mark.parametrize("loss_fn", [MaskedCrossEntropy(), FusedLinearCrossEntropy(chunk_size=7)])
def test_packed_loss_and_gradients_equal_unpacked(loss_fn):
    data = examples([9, 5, 12, 3, 7, 6], seed=1)
    model = dense_model()
    unpacked = collate(data, pad_id=0)
    packed = collate(pack_examples(data, 16), pad_id=0)
    assert count_label_tokens(packed["labels"]) == count_label_tokens(unpacked["labels"])
    model.zero_grad()
    expected, _ = loss_fn(model, unpacked)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got, _ = loss_fn(model, packed)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    padding = 1 - packed["attention_mask"].float().mean()
    assert padding < 1 - unpacked["attention_mask"].float().mean()  # less compute spent on padding


def test_twenty_steps_packed_follow_twenty_steps_unpacked():
    """The same examples each step, packed into rows or padded: AdamW moves both models alike."""
    data = examples([9, 5, 12, 3, 7, 6, 14, 4], seed=2)
    unpacked, packed = collate(data, pad_id=0), collate(pack_examples(data, 20), pad_id=0)
    count = count_label_tokens(unpacked["labels"])
    curves = []
    for batch in (unpacked, packed):
        model = dense_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(20):
            loss, _ = MaskedCrossEntropy()(model, batch)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() / count)
        curves.append(torch.tensor(losses))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-5, atol=1e-5)
    assert curves[0][-1] < curves[0][0]
