"""Training data (tokenising, collation, layout-free order) and losses (global-token normalisation, fused CE)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_dense_config

import ernie45.training.loss as loss_module
from ernie45 import Ernie4_5ForCausalLM
from ernie45.tokenizer import train_tokenizer
from ernie45.training.config import DatasetConfig, LRSchedulerConfig
from ernie45.training.data import (
    IGNORE_INDEX,
    GlobalBatchSampler,
    collate,
    load_records,
    record_texts,
    tokenize_records,
)
from ernie45.training.loss import (
    FusedLinearCrossEntropy,
    MaskedCrossEntropy,
    chunked_linear_cross_entropy,
    count_label_tokens,
)
from ernie45.training.optim import lr_at
from ernie45.training.synthetic import make_examples

SFT_RECORDS = [
    {"prompt": "Question: what is two plus two?", "completion": " Four."},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for r in make_examples(300, seed=0) + SFT_RECORDS for t in record_texts(r)]
    return train_tokenizer(texts, vocab_size=400)


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_hellaswag_loss_is_on_the_gold_ending_only(tokenizer):
    config = DatasetConfig(_target_="ernie45.training.synthetic.SyntheticMultipleChoice", num_examples=5, seed=3)
    records = load_records(config)
    examples = tokenize_records(config, records, tokenizer)
    for record, example in zip(records, examples):
        assert labelled_text(tokenizer, example) == " " + record["endings"][record["label"]]
        assert tokenizer.decode(example.input_ids) == record["ctx"] + " " + record["endings"][record["label"]]


def test_sft_prompt_completion_and_chat_label_only_the_answers(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in SFT_RECORDS) + "\n")
    config = DatasetConfig(_target_="ernie45.training.data.SFTDataset", path_or_dataset=str(path))
    plain, chat = tokenize_records(config, load_records(config), tokenizer)
    assert labelled_text(tokenizer, plain) == " Four." + tokenizer.eos_token
    assert labelled_text(tokenizer, chat) == "Blue.<|end_of_sentence|>Green.<|end_of_sentence|>"
    rendered = tokenizer.apply_chat_template(SFT_RECORDS[1]["messages"], tokenize=False)
    assert tokenizer.decode(chat.input_ids) == rendered


def test_bad_records_and_missing_files_are_named(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n')
    config = DatasetConfig(_target_="ernie45.training.data.SFTDataset", path_or_dataset=str(path))
    with pytest.raises(ValueError, match="bad.jsonl:1 needs prompt \\+ completion, or messages"):
        tokenize_records(config, load_records(config), tokenizer)
    missing = DatasetConfig(_target_="ernie45.training.data.HellaSwag", path_or_dataset=str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="none.jsonl does not exist"):
        load_records(missing)


def test_collate_pads_to_a_multiple_of_8_with_masks(tokenizer):
    config = DatasetConfig(_target_="ernie45.training.synthetic.SyntheticMultipleChoice", num_examples=3, seed=1)
    examples = tokenize_records(config, load_records(config), tokenizer)
    batch = collate(examples, pad_id=0, pad_to_multiple_of=8)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, math.ceil(max(lengths) / 8) * 8)
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert bool((batch["padding_mask"][row] == (batch["attention_mask"][row] == 0)).all())
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
    assert count_label_tokens(batch["labels"]) == sum(e.num_label_tokens for e in examples)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_every_layout_sees_the_same_global_batches(dp_size):
    sampler = GlobalBatchSampler(num_examples=50, global_batch_size=8, local_batch_size=2, seed=7, shuffle=True)
    assert sampler.steps_per_epoch == 6
    for step in (0, 5, 6, 13):
        per_rank = [sampler.micro_batches(step, rank, dp_size) for rank in range(dp_size)]
        seen = sorted(i for rank in per_rank for micro in rank for i in micro)
        assert seen == sorted(sampler.global_batch(step))
        assert all(len(micro) == 2 for rank in per_rank for micro in rank)
    assert sampler.order(0) != sampler.order(1)  # a new order every epoch
    assert sampler.global_batch(6) == sampler.order(1)[:8]


def tiny_model(**overrides):
    torch.manual_seed(0)
    return Ernie4_5ForCausalLM.from_config(tiny_dense_config(**overrides), dtype=torch.float32)


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def random_batch(vocab: int, lengths: list[int], width: int = 16):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), width))
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # a "prompt" without loss
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "padding_mask": mask == 0}


@pytest.mark.parametrize("tied", [True, False])
def test_fused_linear_cross_entropy_matches_masked_cross_entropy(tied):
    batch = random_batch(160, [16, 11, 7])
    results = []
    for loss_fn in (MaskedCrossEntropy(), FusedLinearCrossEntropy(chunk_size=5)):
        model = tiny_model(tie_word_embeddings=tied)
        loss, _ = loss_fn(model, batch)
        loss.backward()
        results.append((loss.detach(), grads_of(model)))
    (masked, masked_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, masked, rtol=1e-5, atol=1e-5)
    assert masked_grads.keys() == fused_grads.keys()
    for name in masked_grads:
        torch.testing.assert_close(fused_grads[name], masked_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_linear_cross_entropy_matches_autograd_with_bias_and_a_scaled_loss(chunk_size):
    """The fused kernel against F.linear + F.cross_entropy, for any chunking, with a bias and an
    upstream gradient other than one (the recipe divides the sum by the global label tokens)."""
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(23, 16), torch.randn(50, 16), torch.randn(50)
    targets = torch.randint(0, 50, (23,))
    reference_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fused_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = reference_inputs
    reference = F.cross_entropy(F.linear(h, w, b), targets, reduction="sum")
    (reference / 3).backward()
    fused = chunked_linear_cross_entropy(*fused_inputs, targets, chunk_size)
    (fused / 3).backward()
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    for ours, theirs, name in zip(fused_inputs, reference_inputs, ("hidden", "weight", "bias")):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


def counted(function, calls: dict, key: str):
    """``function``, counting its calls in ``calls[key]``."""

    def wrapper(*args, **kwargs):
        calls[key] += 1
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_a_frozen_input_gets_no_gradient_product(monkeypatch, frozen):
    """A frozen head (LoRA) or frozen hidden states: the fused kernel makes no product for their
    gradient (one third of the head's FLOPs each), and the other gradient is the reference's."""
    import ernie45.training.loss as fused_loss

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(23, 16), torch.randn(50, 16), torch.randn(50)
    targets = torch.randint(0, 50, (23,))
    trained = "hidden" if frozen == "weight" else "weight"
    reference_inputs = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    reference_inputs[trained].requires_grad_()
    h, w, b = reference_inputs.values()
    F.cross_entropy(F.linear(h, w, b), targets, reduction="sum").backward()
    products = {"hidden": 0, "weight": 0}  # calls of the product that makes each gradient
    for name, grad_of in (("_grad_hidden_into_", "hidden"), ("_add_grad_weight_", "weight")):
        monkeypatch.setattr(fused_loss, name, counted(getattr(fused_loss, name), products, grad_of))
    fused_inputs = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    fused_inputs[trained].requires_grad_()
    chunked_linear_cross_entropy(*fused_inputs.values(), targets, 7).backward()
    torch.testing.assert_close(fused_inputs[trained].grad, reference_inputs[trained].grad, rtol=1e-5, atol=1e-6)
    assert products[frozen] == 0 and products[trained] == 4  # 23 rows in chunks of 7
    assert fused_inputs[frozen].grad is None and fused_inputs["bias"].grad is None


def test_chunked_linear_cross_entropy_under_bf16_autocast_and_a_second_backward():
    """bf16 autocast (fp32 master weights): matmuls in bf16, gradients returned in the inputs'
    dtypes and close to the fp32 ones; a second backward through the same graph is refused."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (40,))
    exact = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    exact_grads = torch.autograd.grad(exact, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, None, targets, 16)
    grads = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(loss, exact, rtol=2e-2, atol=0)
    for ours, theirs in zip(grads, exact_grads):
        assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
    with pytest.raises(RuntimeError, match="backpropagated once"):
        torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_head_gradient_made_in_vocabulary_blocks_is_bitwise_the_whole_product(monkeypatch, chunk_size):
    """Under autocast the head gradient is made a block of vocabulary rows at a time and cast into
    fp32 right away: the very numbers of the whole bf16 product cast afterwards (blocks that do not
    divide V, one chunk or several)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 32), torch.randn(64, 32)
    targets = torch.randint(0, 64, (40,))

    def grads(block_rows):
        monkeypatch.setattr(loss_module, "GRAD_WEIGHT_BLOCK_ROWS", block_rows)
        inputs = [t.clone().requires_grad_() for t in (hidden, weight)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chunked_linear_cross_entropy(*inputs, None, targets, chunk_size).backward()
        return [t.grad for t in inputs]

    whole, blocked = grads(64), grads(24)
    assert blocked[1].dtype == torch.float32
    for ours, theirs in zip(blocked, whole):
        assert torch.equal(ours, theirs)
    if chunk_size == 64:  # one chunk: the whole bf16 product, cast
        h = hidden.bfloat16()
        logits = (h @ weight.bfloat16().T).float()
        d_logits = (logits.softmax(-1) - F.one_hot(targets, 64)).bfloat16()
        torch.testing.assert_close(whole[1], (d_logits.T @ h).float(), rtol=0.02, atol=0.02)


def test_one_chunk_works_in_the_memory_of_the_head_gradient(monkeypatch):
    """Under autocast with one chunk the bf16 cast of an fp32 head weight and the fp32 softmax rows
    live in the memory of the (not yet written) fp32 head gradient, and give the very numbers of
    separate buffers."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 96), torch.randn(300, 96)  # room for the rows: 2 x 40 <= 96
    targets = torch.randint(0, 300, (40,))
    workspaces = []

    def loss_and_grads():
        inputs = [t.clone().requires_grad_() for t in (hidden, weight)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_linear_cross_entropy(*inputs, None, targets, 64)
        loss.backward()
        return [loss] + [t.grad for t in inputs]

    real = loss_module._workspace_in_gradient
    monkeypatch.setattr(loss_module, "_workspace_in_gradient", lambda *args: workspaces.append(real(*args)) or workspaces[-1])
    shared = loss_and_grads()
    (cast, rows), grad_weight = workspaces[0], shared[2]
    assert cast.dtype == torch.bfloat16 and rows.dtype == grad_weight.dtype == torch.float32
    assert grad_weight.data_ptr() == cast.data_ptr() < rows.data_ptr() < grad_weight.data_ptr() + grad_weight.nbytes
    monkeypatch.setattr(loss_module, "_workspace_in_gradient", lambda *args: (None, None))
    separate = loss_and_grads()
    for ours, theirs, name in zip(shared, separate, ("loss", "hidden", "weight")):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_head_products_in_cpu_tiles_are_bitwise_the_whole_products(monkeypatch, chunk_size):
    """Under bf16 autocast on a CPU the logits are made a tile of vocabulary rows at a time and the
    hidden-state gradient a tile of tokens at a time: the very numbers of the whole products (tiles
    that do not divide V or the tokens, one chunk or several)."""
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(40, 32), torch.randn(64, 32), torch.randn(64)
    targets = torch.randint(0, 64, (40,))

    def loss_and_grads(vocab_rows, tokens):
        monkeypatch.setattr(loss_module, "LOGITS_TILE_ROWS", vocab_rows)
        monkeypatch.setattr(loss_module, "GRAD_HIDDEN_TILE_TOKENS", tokens)
        inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_linear_cross_entropy(*inputs, targets, chunk_size)
        loss.backward()
        return [loss] + [t.grad for t in inputs]

    whole, tiled = loss_and_grads(64, 64), loss_and_grads(24, 7)
    for ours, theirs, name in zip(tiled, whole, ("loss", "hidden", "weight", "bias")):
        assert torch.equal(ours, theirs), name


def test_micro_batches_normalised_by_global_tokens_equal_one_big_batch():
    """Splitting a batch into micro-batches of different token counts must not reweight tokens."""
    batch = random_batch(160, [16, 4, 9, 13])
    loss_fn = MaskedCrossEntropy()
    whole = tiny_model()
    loss, _ = loss_fn(whole, batch)
    (loss / count_label_tokens(batch["labels"])).backward()
    split = tiny_model()
    total = count_label_tokens(batch["labels"])
    for rows in ([0], [1, 2], [3]):
        micro = {key: value[rows] for key, value in batch.items()}
        micro_loss, _ = loss_fn(split, micro)
        (micro_loss / total).backward()
    for name, grad in grads_of(whole).items():
        torch.testing.assert_close(grads_of(split)[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lr_schedules_warm_up_then_decay_to_min_lr():
    cosine = LRSchedulerConfig(lr_decay_style="cosine", lr_warmup_steps=4, min_lr=0.1)
    lrs = [lr_at(step, 20, 1.0, cosine) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and 0.1 <= lrs[-1] < 0.15
    linear = LRSchedulerConfig(lr_decay_style="linear", lr_decay_steps=10, min_lr=0.0)
    assert lr_at(5, 100, 1.0, linear) == pytest.approx(0.5) and lr_at(50, 100, 1.0, linear) == 0.0
    constant = LRSchedulerConfig(lr_decay_style="constant")
    assert {lr_at(step, 10, 0.3, constant) for step in range(10)} == {0.3}


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_chunked_linear_cross_entropy_in_pure_bf16_returns_bf16_gradients(chunk_size):
    """bf16 weights without autocast (one chunk, or several accumulated in fp32): gradients come
    back in bf16 and match the fp32 reference within bf16 resolution."""
    torch.manual_seed(0)
    hidden32, weight32 = torch.randn(40, 32), torch.randn(64, 32)
    targets = torch.randint(0, 64, (40,))
    exact = [t.clone().requires_grad_() for t in (hidden32, weight32)]
    F.cross_entropy(F.linear(*exact), targets, reduction="sum").backward()
    inputs = [t.bfloat16().requires_grad_() for t in (hidden32, weight32)]
    chunked_linear_cross_entropy(inputs[0], inputs[1], None, targets, chunk_size).backward()
    for ours, theirs in zip(inputs, exact):
        assert ours.grad.dtype == torch.bfloat16
        assert (ours.grad.float() - theirs.grad).abs().max() < 0.05 * theirs.grad.abs().max()


def test_tied_head_gradient_is_completed_by_the_embedding_backward(tmp_path):
    """Tied weights: the fused loss hands the head's weight gradient to the embedding's backward
    (one [V,H] gradient, no zero-filled second one). The shared weight's gradient equals
    transformers' (the padding row, id 0, gets none from the lookup), whether the fused loss
    claimed it or a loss on full logits left it unclaimed."""
    from transformers import Ernie4_5ForCausalLM as HFErnie

    from builders import random_hf_model

    hf = random_hf_model(HFErnie, tiny_dense_config(pad_token_id=0))
    hf.save_pretrained(tmp_path)
    batch = random_batch(160, [16, 11, 7])
    batch["input_ids"][0, 5] = batch["input_ids"][2, 12] = 0  # the pad id, inside and after a sequence
    reference = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (F.cross_entropy(reference[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")).backward()
    expected = hf.model.embed_tokens.weight.grad
    for loss_fn, claimed in ((FusedLinearCrossEntropy(chunk_size=7), True), (MaskedCrossEntropy(), False)):
        model = Ernie4_5ForCausalLM.from_pretrained(tmp_path)
        loss, _ = loss_fn(model, batch)
        assert model.get_decoder().head_gradient.claimed is claimed
        loss.backward()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(model.model.embed_tokens.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_stale_head_gradient_is_never_claimed():
    """A forward that gives embeddings directly has no meeting point, even after one from ids that
    nobody claimed: the fused loss then returns the head gradient itself."""
    model = tiny_model()
    batch = random_batch(160, [16, 11])
    model(batch["input_ids"])  # a forward whose meeting point nobody claims
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    assert model.get_decoder().head_gradient is None
    fused = FusedLinearCrossEntropy().summed(model.lm_head, hidden[:, :-1], batch["labels"][:, 1:])
    fused.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 7), (37, 1000), (5, 103424)])
def test_in_place_log_softmax_is_bitwise_torchs(shape):
    """The fused CE's and scoring's in-place log-softmax (out= its own input on CPU) equals
    torch.log_softmax bit for bit, vectorisation tails included."""
    from ernie45.models.loss import log_softmax_

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5
    y = x.clone()
    log_softmax_(y)
    assert torch.equal(y, torch.log_softmax(x, -1))


@pytest.mark.parametrize("rows, dtype", [(1, torch.float32), (70, torch.bfloat16), (64, torch.float32)])
def test_target_logprobs_in_blocks_equal_a_whole_fp32_log_softmax(rows, dtype):
    """Scoring's picks (fp32 log-softmax 32 rows at a time, a last partial block) are bitwise the
    picks of one fp32 log-softmax over all rows, for low-precision logits too."""
    from ernie45.models.loss import target_logprobs

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, 1000, generator=generator) * 5).to(dtype)
    targets = torch.randint(0, 1000, (rows,), generator=generator)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    got = target_logprobs(logits, targets)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
