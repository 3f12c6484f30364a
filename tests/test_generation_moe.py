"""KV-cache generation on the MoE model: greedy parity with transformers' generate, cached vs uncached."""

from __future__ import annotations

import pytest

import ernie45
from ernie45 import BackendConfig

from builders import VARIED, random_hf_moe, tiny_moe_config
from test_generation import assert_cached_steps_match_uncached, assert_greedy_parity


def _moe_pair(tmp_path, experts: str = "torch_mm"):
    hf = random_hf_moe(tiny_moe_config(**VARIED))
    hf.save_pretrained(tmp_path)
    return hf, ernie45.from_pretrained(tmp_path, backend=BackendConfig(experts=experts))


@pytest.mark.parametrize("experts, ending", [("torch_mm", "config_eos"), ("torch", "one_row_ends_early")])
def test_moe_greedy_matches_transformers_generate(tmp_path, experts, ending):
    assert_greedy_parity(*_moe_pair(tmp_path, experts), ending)


def test_moe_cached_steps_equal_argmax_of_uncached_forward(tmp_path):
    assert_cached_steps_match_uncached(_moe_pair(tmp_path)[1])
