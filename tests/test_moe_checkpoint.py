"""MoE checkpoints: the HF per-expert layout both ways, transformers reading what we write bit for bit,
release-style MTP tensors, error messages, and parameter/FLOP accounting at release sizes (meta)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Ernie4_5_MoeConfig
from transformers import Ernie4_5_MoeForCausalLM as HFMoe

import ernie45
from ernie45 import Ernie4_5_MoeForCausalLM
from ernie45.checkpoint import CheckpointError, CheckpointFiles
from ernie45.checkpoint.hf_adapter import read_native, read_native_into
from ernie45.checkpoint.hf_checkpoint import native_tensors

from builders import random_hf_moe, tiny_moe_config


def read_all(directory) -> dict[str, torch.Tensor]:
    files = CheckpointFiles(directory)
    return {key: files.get(key) for key in files.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [{}, dict(use_bias=True, tie_word_embeddings=False, moe_num_shared_experts=0)])
def test_save_matches_transformers_and_reloads_bit_exact(tmp_path, dtype, overrides):
    random_hf_moe(tiny_moe_config(**overrides), bias_std=0.3).save_pretrained(tmp_path / "seed")
    hf = HFMoe.from_pretrained(tmp_path / "seed", dtype=dtype)
    hf.save_pretrained(tmp_path / "hf")
    ours = ernie45.from_pretrained(tmp_path / "hf")
    assert ours.dtype == dtype
    ours.save_pretrained(tmp_path / "ours")

    written, reference = read_all(tmp_path / "ours"), read_all(tmp_path / "hf")
    assert set(written) == set(reference)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in written
    for key, tensor in reference.items():
        assert written[key].dtype == tensor.dtype and written[key].shape == tensor.shape, key
        assert torch.equal(written[key], tensor), key
    assert written["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert written["model.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (1, 8)
    assert written["model.layers.1.mlp.moe_statics.e_score_correction_bias"].dtype == torch.float32

    reloaded, info = HFMoe.from_pretrained(tmp_path / "ours", dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = reloaded.state_dict()
    ours_state = {k: v for k, v in native_tensors(ours).items()}
    for name, tensor in ours_state.items():
        hf_key = name.replace("mlp.moe_statics.", "mlp.gate.moe_statics.")
        assert torch.equal(state[hf_key], tensor), name


def test_sharded_save_round_trip(tmp_path):
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config())
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    again = ernie45.from_pretrained(tmp_path / "out")
    for name, tensor in native_tensors(model).items():
        assert torch.equal(native_tensors(again)[name], tensor), name
    ids = torch.randint(0, 160, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_expert_slices_read_only_those_experts(tmp_path):
    """What a rank holding experts [2, 5) reads under expert parallelism."""
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    files = CheckpointFiles(tmp_path)
    full = read_native(files, "model.layers.2.mlp.experts.gate_up_proj", (8, 32, 32))
    part = read_native(files, "model.layers.2.mlp.experts.gate_up_proj", (8, 32, 32), index=(slice(2, 5),))
    assert torch.equal(part, full[2:5])
    gate = files.get("model.layers.2.mlp.experts.3.gate_proj.weight")
    up = files.get("model.layers.2.mlp.experts.3.up_proj.weight")
    assert torch.equal(full[3], torch.cat([gate, up]))  # gate rows first, then up


def test_expert_slice_across_gate_and_up_is_cut_and_cast(tmp_path):
    """An index that straddles the gate/up boundary and narrows columns (as TP may), read cast."""
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    files = CheckpointFiles(tmp_path)
    key, shape = "model.layers.2.mlp.experts.gate_up_proj", (8, 32, 32)
    index = (slice(1, 4), slice(8, 24), slice(4, 20))
    gate_up = [[files.get(f"model.layers.2.mlp.experts.{e}.{n}_proj.weight") for n in ("gate", "up")] for e in range(8)]
    expected = torch.stack([torch.cat(pair) for pair in gate_up])[index]
    read = read_native(files, key, shape, index, dtype=torch.bfloat16)
    assert read.dtype == torch.bfloat16 and torch.equal(read, expected.to(torch.bfloat16))
    out = torch.full((3, 16, 16), float("nan"))
    read_native_into(files, key, shape, out, index)
    assert torch.equal(out, expected)


def _rewrite(directory, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_mtp_tensors_are_skipped_with_one_log_line(tmp_path, caplog):
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    reference = ernie45.from_pretrained(tmp_path)

    def add_mtp(tensors):
        tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(32, 64)
        tensors["model.mtp_emb_norm.0.weight"] = torch.ones(32)
        tensors["model.mtp_block.0.mlp.gate.weight"] = torch.zeros(8, 32)

    _rewrite(tmp_path, add_mtp)
    with caplog.at_level(logging.INFO, logger="ernie45"):
        model = ernie45.from_pretrained(tmp_path)
    lines = [r for r in caplog.records if "mtp" in r.getMessage()]
    assert len(lines) == 1 and "3" in lines[0].getMessage()
    for name, tensor in native_tensors(reference).items():
        assert torch.equal(native_tensors(model)[name], tensor)


def test_wrong_expert_shape_names_key_and_shapes(tmp_path):
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(key, torch.zeros(12, 32)))
    with pytest.raises(CheckpointError) as err:
        ernie45.from_pretrained(tmp_path)
    message = str(err.value)
    assert key in message and "[16, 32]" in message and "[12, 32]" in message


def test_missing_expert_names_layer_and_expert(tmp_path):
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.6.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.6\.down_proj\.weight"):
        ernie45.from_pretrained(tmp_path)
    files = CheckpointFiles(tmp_path)
    with pytest.raises(CheckpointError, match="layer 1 expert 6"):
        read_native(files, "model.layers.1.mlp.experts.down_proj", (8, 32, 16))


# ----- accounting ---------------------------------------------------------------------------------
# ERNIE-4.5-21B-A3B-PT and -300B-A47B-PT (config.json of the releases; DESIGN.md section 3).
RELEASES = {
    "21B-A3B": dict(
        vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
        num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6,
        moe_intermediate_size=1536, moe_num_shared_experts=2, moe_layer_start_index=1,
        moe_layer_end_index=27, tie_word_embeddings=True,
    ),
    "300B-A47B": dict(
        vocab_size=103424, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, moe_num_experts=64, moe_k=8,
        moe_intermediate_size=3584, moe_num_shared_experts=0, moe_layer_start_index=3,
        moe_layer_end_index=53, tie_word_embeddings=False,
    ),
}
EXPECTED_COUNTS = {  # (total, active): measured with this code, equal to transformers' count
    "21B-A3B": (21_825_437_888, 3_352_150_208),
    "300B-A47B": (299_484_163_264, 47_926_586_560),
}


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_configs_build_on_meta_with_transformers_parameter_count(name):
    config = Ernie4_5_MoeConfig(**RELEASES[name])
    with torch.device("meta"):
        hf = HFMoe(config)
    ours = Ernie4_5_MoeForCausalLM.from_config(config, device="meta", dtype=torch.bfloat16)
    counted = sum(t.numel() for t in native_tensors(ours).values())
    assert ours.num_parameters() == counted == hf.num_parameters()
    assert (ours.num_parameters(), ours.num_parameters(active_only=True)) == EXPECTED_COUNTS[name]
    layer = ours.moe_layers()[0]
    assert layer.gate.weight.dtype == torch.float32 and layer.experts.gate_up_proj.dtype == torch.bfloat16
    m = ours.moe_config
    inactive = (m.n_routed_experts - m.n_activated_experts) * 3 * m.dim * m.moe_inter_dim * len(ours.moe_layers())
    assert ours.num_parameters() - ours.num_parameters(active_only=True) == inactive


def test_flops_per_token_formula():
    config = tiny_moe_config(use_bias=True, tie_word_embeddings=False)
    model = Ernie4_5_MoeForCausalLM(config)
    h, v, layers = 32, 160, 3
    attention = h * (2 * 32 + 2 * 16)  # q, o: 4x8 wide; k, v: 2x8 wide
    dense = 3 * h * 48
    moe = 2 * 3 * h * 16 + 3 * h * 16 + 8 * h  # K experts + shared + router
    matmul = v * h + layers * attention + dense + 2 * moe
    assert model.flops_per_token(64) == 6 * matmul + 12 * layers * 4 * 8 * 64


def test_dense_accounting_matches_transformers():
    from transformers import Ernie4_5ForCausalLM as HFDense

    from builders import tiny_dense_config

    for overrides in ({}, dict(use_bias=True, tie_word_embeddings=False)):
        config = tiny_dense_config(**overrides)
        ours = ernie45.Ernie4_5ForCausalLM(config)
        assert ours.num_parameters() == ours.num_parameters(active_only=True) == HFDense(config).num_parameters()
        matmul = config.vocab_size * 64 + 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 96)
        assert ours.flops_per_token(10) == 6 * matmul + 12 * 2 * 4 * 16 * 10
