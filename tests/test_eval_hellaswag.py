"""HellaSwag scoring: loading and lm-eval preprocessing, exact log-likelihoods, acc vs acc_norm, the CLI."""

from __future__ import annotations

import json
import shutil
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ernie45
from ernie45.cli import app
from ernie45.evaluation import (
    HellaSwagExample,
    encode_pair,
    evaluate_hellaswag,
    example_from_record,
    load_hellaswag,
    loglikelihoods,
    truncate_left,
)
from ernie45.tokenizer import train_tokenizer

from builders import HELLASWAG, hellaswag_records, load_tokenizer, training_texts


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(training_texts(), vocab_size=320)


# ----- data -----------------------------------------------------------------------------------------
def test_loads_the_first_examples_of_the_real_file():
    examples = load_hellaswag(HELLASWAG, limit=5)
    records = hellaswag_records(5)
    assert len(examples) == 5
    for example, record in zip(examples, records):
        assert example.context == record["ctx"]
        assert len(example.endings) == 4 and example.label == record["label"]


def test_original_fields_are_joined_and_cleaned_like_lm_eval():
    record = {
        "activity_label": "Baking",
        "ctx_a": "She mixes [header] the flour.",
        "ctx_b": "then she",
        "endings": ["bakes it [title] in the oven.", " waits. "],
        "label": 1,
    }
    example = example_from_record(record)
    assert example.context == "Baking: She mixes the flour. Then she"
    assert example.endings == ("bakes it. in the oven.", "waits.")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "a", "label": 0}', r"bad.jsonl:2 lacks HellaSwag field\(s\) \['endings'\]"),
        ('{"ctx": "a", "endings": ["b"], "label": 3}', "bad.jsonl:2: label=3 must index one of its 1 endings"),
    ],
)
def test_bad_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_hellaswag(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("# not json\n", r"bad.jsonl:1 is not valid JSON"),
        ('[{"ctx": "a"}]\n', "bad.jsonl:1 is a JSON list, not an object"),
        ("\n", "bad.jsonl holds no HellaSwag examples"),
    ],
)
def test_a_file_that_is_not_hellaswag_jsonl_is_named(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_hellaswag(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_hellaswag(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"HellaSwag file {tmp_path} is a directory"):
        load_hellaswag(tmp_path)


# ----- scoring --------------------------------------------------------------------------------------
class UniformLM(nn.Module):
    """Every next token has probability 1/V, so a continuation of n tokens scores exactly -n log V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=512)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        """Zero logits for the kept tokens ([N,V] for a boolean [B,S] mask, as ernie45's models)."""
        return SimpleNamespace(logits=torch.zeros(int(logits_to_keep.sum()), self.config.vocab_size))


def test_hand_built_example_separates_acc_from_acc_norm(tokenizer):
    # Under a uniform model the short ending has the higher total log-likelihood (fewer tokens),
    # while the long ending has the higher log-likelihood per character.
    short, long = "a", "the the"
    context = "She walks to the door and"
    n_short = len(encode_pair(tokenizer, context, " " + short)[1])
    n_long = len(encode_pair(tokenizer, context, " " + long)[1])
    assert (n_short, n_long) == (1, 2), "premise: ' a' is one token, ' the the' two"
    model = UniformLM(len(tokenizer))
    log_v = math.log(len(tokenizer))
    assert -n_short * log_v > -n_long * log_v and -n_short * log_v / len(short) < -n_long * log_v / len(long)

    for label, acc, acc_norm in [(0, 1.0, 0.0), (1, 0.0, 1.0)]:
        example = HellaSwagExample(context, (short, long), label)
        result = evaluate_hellaswag(model, tokenizer, [example], progress=False)
        assert (result["acc"], result["acc_norm"]) == (acc, acc_norm)
    lls = loglikelihoods(model, [encode_pair(tokenizer, context, " " + e) for e in (short, long)], progress=False)
    assert lls == pytest.approx([-n_short * log_v, -n_long * log_v])


def test_encode_pair_splits_where_the_context_encoding_ends(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "A man is sitting on a roof. he ", "is using wrap.")
    assert context_ids == tokenizer.encode("A man is sitting on a roof. he", add_special_tokens=False)
    assert tokenizer.decode(continuation_ids) == " is using wrap."


def test_batched_left_padded_scores_equal_one_sequence_at_a_time(tiny_lm_dir):
    model = ernie45.from_pretrained(tiny_lm_dir)
    tok = load_tokenizer(tiny_lm_dir)
    examples = load_hellaswag(HELLASWAG, limit=3)
    pairs = [encode_pair(tok, ex.context, " " + e) for ex in examples for e in ex.endings]
    assert len({len(c) + len(e) for c, e in pairs}) > 3, "premise: sequences of many lengths"
    batched = loglikelihoods(model, pairs, batch_size=5, progress=False)
    with torch.no_grad():
        for (ctx, cont), got in zip(pairs, batched):
            full = torch.tensor([ctx + cont])
            logprobs = model(full[:, :-1]).logits.float().log_softmax(-1)[0, -len(cont) :]  # [C,V]
            expected = logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert got == pytest.approx(expected, abs=1e-4)


def test_truncate_left_keeps_the_last_tokens_context_first():
    assert truncate_left([1, 2, 3], [4, 5], max_len=10) == ([1, 2, 3], [4, 5])
    assert truncate_left([1, 2, 3], [4, 5], max_len=3) == ([2, 3], [4, 5])  # 4 tokens = max_len + 1
    assert truncate_left([1, 2, 3], [4, 5, 6, 7, 8], max_len=3) == ([], [5, 6, 7, 8])


def test_sequences_longer_than_the_model_window_are_scored_on_what_fits(tiny_lm_dir):
    model = ernie45.from_pretrained(tiny_lm_dir)
    window = model.config.max_position_embeddings
    vocab = model.config.vocab_size
    context, long_continuation = [5, 6, 7], [(11 * i) % (vocab - 3) + 3 for i in range(window + 9)]
    got = loglikelihoods(model, [(context, long_continuation)], progress=False)[0]
    kept = long_continuation[-(window + 1) :]  # the first kept token has no context left to predict it
    with torch.no_grad():
        logprobs = model(torch.tensor([kept[:-1]])).logits.float().log_softmax(-1)[0]  # [window,V]
    expected = logprobs.gather(-1, torch.tensor(kept[1:])[:, None]).sum().item()
    assert got == pytest.approx(expected, abs=1e-3)


def test_an_ending_longer_than_the_window_is_counted_warned_and_normalised_by_what_is_scored(tokenizer):
    # A uniform model scores each token -log V. The long ending is cut to the window: counted and
    # divided by the characters of the tokens scored, so acc_norm picks the dense short ending; dividing
    # by the whole ending's characters (the old rule) would make the long one win by far.
    window, short, long = 16, "the the the", " ".join(["a"] * 400)
    context = "She walks to the door and"
    _, long_ids = encode_pair(tokenizer, context, " " + long)
    assert len(long_ids) > 10 * window and len(encode_pair(tokenizer, context, " " + short)[1]) == 3, "premise"
    model = UniformLM(len(tokenizer))
    model.config.max_position_embeddings = window
    with pytest.warns(UserWarning, match="1 of 1 examples exceed the model's window of 16 tokens.* 1 endings"):
        result = evaluate_hellaswag(model, tokenizer, [HellaSwagExample(context, (short, long), 0)], progress=False)
    assert (result["truncated_examples"], result["truncated_endings"]) == (1, 1)
    log_v = math.log(len(tokenizer))
    scored = long_ids[-window:]  # window + 1 kept, the first has no context left to predict it
    per_char_long = -window * log_v / len(tokenizer.decode(scored).strip())
    assert -window * log_v / len(long) > -3 * log_v / len(short) > per_char_long, "premise: the two rules disagree"
    assert (result["acc"], result["acc_norm"]) == (1.0, 1.0)


def test_evaluate_on_real_examples_reports_fractions_and_restores_train_mode(tiny_lm_dir):
    model = ernie45.from_pretrained(tiny_lm_dir).train()
    result = evaluate_hellaswag(model, load_tokenizer(tiny_lm_dir), hellaswag_records(12), batch_size=8, limit=8)
    assert result["num_examples"] == 8
    for key in ("acc", "acc_norm"):
        assert 0.0 <= result[key] <= 1.0
        assert result[f"{key}_stderr"] is not None and result[f"{key}_stderr"] >= 0
    assert result["examples_per_second"] > 0
    assert model.training


def test_bad_batch_size_is_named(tokenizer):
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        evaluate_hellaswag(UniformLM(len(tokenizer)), tokenizer, load_hellaswag(HELLASWAG, 1), batch_size=0)


# ----- command line ---------------------------------------------------------------------------------
def test_cli_reports_progress_and_writes_json(tiny_lm_dir, tmp_path):
    out = tmp_path / "res" / "hellaswag.json"
    args = ["eval", "hellaswag", "--model", str(tiny_lm_dir), "--data", str(HELLASWAG), "--limit", "4"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "8", "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["num_examples"] == 4 and 0 <= saved["acc"] <= 1 and 0 <= saved["acc_norm"] <= 1
    assert f"acc {saved['acc']:.4f}" in result.stdout
    assert "hellaswag: 100%" in result.stderr and "16/16" in result.stderr  # the progress bar, 4 x 4 sequences


def test_cli_prints_its_warnings_as_one_line(tiny_lm_dir, tmp_path):
    """A cut context is one ``warning: ...`` line, not Python's file:line and source echo."""
    short = tmp_path / "short-window"
    shutil.copytree(tiny_lm_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 24}))
    args = ["eval", "hellaswag", "--model", str(short), "--data", str(HELLASWAG), "--limit", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "exceed the model's window of 24 tokens" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: hellaswag: ") and "UserWarning" not in result.stderr


def test_cli_names_a_missing_data_file(tiny_lm_dir, tmp_path):
    args = ["eval", "hellaswag", "--model", str(tiny_lm_dir), "--data", str(tmp_path / "none.jsonl")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "none.jsonl does not exist" in result.stderr


def test_cli_checks_the_output_path_before_evaluating(tiny_lm_dir, tmp_path):
    args = ["eval", "hellaswag", "--model", str(tiny_lm_dir), "--data", str(HELLASWAG), "--limit", "1"]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2
    assert f"--output {tmp_path} is a directory; give a file path" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, [*args, "--output", str(blocker / "res.json"), "--device", "cpu"])
    assert result.exit_code == 2
    assert f"cannot create the folder of --output {blocker / 'res.json'}" in result.stderr
    assert "hellaswag:" not in result.stderr  # failed before the evaluation started
