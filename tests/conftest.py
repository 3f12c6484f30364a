"""Fixtures only: tiny random ERNIE 4.5 checkpoints written to disk (the builders are in builders.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5ForCausalLM

from builders import random_hf_model, save_tiny_lm, tiny_dense_config

# NOTE: tiny models are dominated by per-op overhead; one thread is faster and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def keep_the_thread_count():
    """Undo a test's torch.set_num_threads (benchmarks/measure.py sets 2): two threads on a busy
    2-core machine made each later greedy-generation test take about 6 s instead of 0.3 s."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dense_checkpoint(tmp_path):
    """(directory, transformers model) for a tiny dense model saved by transformers."""
    model = random_hf_model(Ernie4_5ForCausalLM, tiny_dense_config())
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random dense model (our save) beside a tokenizer trained on HellaSwag text; read-only."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
