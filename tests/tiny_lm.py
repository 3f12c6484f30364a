"""A tiny random ERNIE 4.5 model saved beside a real trained tokenizer, for generation and eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import ernie45
from ernie45.tokenizer import train_tokenizer

from conftest import tiny_dense_config

HELLASWAG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"
TOKENIZER_VOCAB = 320


def hellaswag_records(limit: int) -> list[dict]:
    with HELLASWAG.open() as lines:
        return [json.loads(line) for line, _ in zip(lines, range(limit))]


def training_texts() -> list[str]:
    """Real English (HellaSwag contexts and endings) plus chat words, to train the tokenizer on."""
    texts = [r["ctx"] + " " + " ".join(r["endings"]) for r in hellaswag_records(200)]
    return texts + ["User: hello there, how are you?\nAssistant: I am fine, thank you."] * 5


def save_tiny_lm(path: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random dense model (our save_pretrained) and a trained tokenizer to ``path``."""
    tokenizer = train_tokenizer(training_texts(), vocab_size=TOKENIZER_VOCAB)
    values = dict(vocab_size=TOKENIZER_VOCAB, initializer_range=0.3, tie_word_embeddings=False)
    values.update(config_overrides)
    torch.manual_seed(seed)
    model = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config(**values))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)
