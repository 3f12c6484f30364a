"""``ernie45 generate``: streamed prompt continuation and multi-turn chat with the tokenizer's template."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import ernie45
from ernie45.chat import chat_end_ids, stream_text
from ernie45.cli import app

from builders import load_tokenizer

PROMPT = "A man is sitting on a roof. he"


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, ["generate", *args, "--device", "cpu"], input=stdin)


def _greedy_reply(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> str:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_prompt_prints_the_greedy_continuation(tiny_lm_dir):
    result = _run("--model", str(tiny_lm_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    model, tokenizer = ernie45.from_pretrained(tiny_lm_dir), load_tokenizer(tiny_lm_dir)
    expected = _greedy_reply(model, tokenizer, tokenizer.encode(PROMPT), 12)
    assert expected.strip()
    assert result.stdout == expected + "\n"


def test_text_is_streamed_piece_by_piece(tiny_lm_dir):
    model, tokenizer = ernie45.from_pretrained(tiny_lm_dir), load_tokenizer(tiny_lm_dir)
    pieces: list[str] = []
    text = stream_text(model, tokenizer, tokenizer.encode(PROMPT), pieces.append, max_new_tokens=12, eos_token_id=[])
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == text


def test_chat_keeps_the_conversation_across_turns(tiny_lm_dir):
    turns = ["hello there", "how are you?"]
    result = _run("--model", str(tiny_lm_dir), "--chat", "--max-new-tokens", "10", stdin="\n".join(turns) + "\n\n")
    assert result.exit_code == 0, result.output

    model, tokenizer = ernie45.from_pretrained(tiny_lm_dir), load_tokenizer(tiny_lm_dir)
    messages, expected = [], ""
    for user in turns:
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply = _greedy_reply(model, tokenizer, prompt_ids, 10, eos_token_id=chat_end_ids(model, tokenizer))
        messages.append({"role": "assistant", "content": reply.strip()})
        expected += f"User: Assistant: {reply}\n"
    assert prompt.startswith("<|begin_of_sentence|>User: hello there\nAssistant: ")  # ERNIE's format, turn 1 kept
    assert result.stdout == expected + "User: "
    assert "(a blank line, /exit or Ctrl-D ends the chat)" in result.stderr
    for end in ("/exit", " /quit "):  # a command ends it as a blank line does, and is not sent to the model
        ended = _run("--model", str(tiny_lm_dir), "--chat", "--max-new-tokens", "10", stdin="\n".join([*turns, end, "more"]) + "\n")
        assert ended.exit_code == 0 and ended.stdout == result.stdout, ended.output


def test_seeded_sampling_from_the_cli_is_reproducible(tiny_lm_dir):
    args = ("--model", str(tiny_lm_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0.9")
    first = _run(*args, "--top-p", "0.95", "--seed", "3")
    assert first.exit_code == 0, first.output
    assert _run(*args, "--top-p", "0.95", "--seed", "3").stdout == first.stdout


def test_repetition_options_from_the_cli_reach_generate(tiny_lm_dir):
    result = _run("--model", str(tiny_lm_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                  "--repetition-penalty", "0.05", "--no-repeat-ngram-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    model, tokenizer = ernie45.from_pretrained(tiny_lm_dir), load_tokenizer(tiny_lm_dir)
    expected = _greedy_reply(model, tokenizer, tokenizer.encode(PROMPT), 12, repetition_penalty=0.05, no_repeat_ngram_size=2)
    assert result.stdout == expected + "\n"
    assert expected != _greedy_reply(model, tokenizer, tokenizer.encode(PROMPT), 12)  # the options changed the reply


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give exactly one of --prompt TEXT or --chat"),
        (("--prompt", "x", "--repetition-penalty", "0"), "--repetition-penalty 0.0 must be > 0 and finite"),
        (("--prompt", "x", "--no-repeat-ngram-size", "-2"), "--no-repeat-ngram-size -2 must be >= 0"),
        (("--prompt", "x", "--temperature", "1", "--min-p", "3"), "min_p=3.0 must be in [0, 1]"),
        (("--prompt", "x", "--chat"), "give exactly one of --prompt TEXT or --chat"),
        (("--prompt", ""), "the prompt is empty"),
        (("--prompt", "x", "--temperature", "0.5", "--top-p", "2"), r"top_p=2.0 must be in (0, 1]"),
        (("--prompt", "x", "--temperature", "-1"), "--temperature -1.0 must be >= 0"),
        (("--prompt", "x", "--dtype", "float33"), "--dtype 'float33' is not valid"),
        (("--prompt", "x", "--dtype", "int8"), "--dtype 'int8' is not valid"),
    ],
)
def test_bad_options_exit_with_a_clear_message(tiny_lm_dir, args, message):
    result = _run("--model", str(tiny_lm_dir), *args)
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    "device, message",
    [
        ("foo", "--device 'foo' is not valid; use cpu, cuda"),
        ("mps", "--device 'mps' is not supported"),
        pytest.param(
            "cuda", "--device 'cuda': torch sees no CUDA GPU here; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_bad_device_is_one_line_not_a_traceback(tiny_lm_dir, device, message):
    args = ["generate", "--model", str(tiny_lm_dir), "--prompt", "x", "--device", device]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_tokenizer_is_named(tiny_lm_dir, tmp_path):
    path = tmp_path / "model_only"
    ernie45.from_pretrained(tiny_lm_dir).save_pretrained(path)
    result = _run("--model", str(path), "--prompt", "x")
    assert result.exit_code == 2
    assert f"no tokenizer could be loaded from {path}" in result.stderr


def test_missing_tokenizer_directory_is_named_without_hub_jargon(tiny_lm_dir, tmp_path):
    result = _run("--model", str(tiny_lm_dir), "--prompt", "x", "--tokenizer", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert f"tokenizer directory {tmp_path / 'nope'} does not exist; pass --tokenizer PATH" in result.stderr
    assert "repo" not in result.stderr.lower()
