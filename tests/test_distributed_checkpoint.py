"""HF checkpoints straight into FSDP2 / TP / EP layouts and back out.

Loading: each rank reads exactly the bytes of the shards it holds (counted at the safetensors
reader) and the sharded model gives the single-process logits. Saving: the consolidated files
from every layout reload in transformers bit-exactly and match a single-process save file by file.
"""

from __future__ import annotations

import pytest
import torch

import ernie45
from builders import make_routing_matter, random_hf_model, tiny_dense_config, tiny_moe_config, token_batch
from dist_checks import assert_close, count_reads, reloads_bit_exactly, same_files
from dist_harness import run_ranks
from ernie45.checkpoint.hf_checkpoint import native_tensors
from ernie45.checkpoint.safetensors_io import CheckpointFiles
from ernie45.distributed import ParallelConfig
from ernie45.sharding import local_part

SHARD_SIZE = "40KB"  # small enough that every checkpoint here spans several files


def _load_and_save(rank: int, world: int, source: str, layout: dict, target: str) -> None:
    reference = ernie45.from_pretrained(source, dtype=torch.float32)
    reads: list[int] = []
    count_reads(reads)
    parallel = ParallelConfig(param_dtype=torch.float32, **layout)
    model = ernie45.from_pretrained(source, dtype=torch.float32, parallel=parallel)

    held = sum(local_part(t).numel() * t.element_size() for t in native_tensors(model).values())
    assert sum(reads) == held, f"rank {rank} read {sum(reads)} bytes but holds {held}"
    batch = token_batch(reference.config.vocab_size, 2, 12)
    with torch.no_grad():
        diff = assert_close(model(batch).logits, reference(batch).logits, f"logits after loading into {layout}")
    model.save_pretrained(target, max_shard_size=SHARD_SIZE)  # the sharded save, bound by parallelize_model
    if rank == 0:
        reference.save_pretrained(target + "-single", max_shard_size=SHARD_SIZE)
        total = sum(t.numel() * t.element_size() for t in native_tensors(reference).values())
        print(f"load {layout}: logits {diff:.2e}, rank 0 read {sum(reads)} of {total} bytes")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"dense": (dir, hf model), "moe": (dir, hf model)} saved by transformers (several shard files)."""
    from transformers import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM

    root = tmp_path_factory.mktemp("hf")
    dense = random_hf_model(Ernie4_5ForCausalLM, tiny_dense_config(use_bias=True))
    moe = random_hf_model(Ernie4_5_MoeForCausalLM, tiny_moe_config(tie_word_embeddings=False))
    make_routing_matter(moe)
    for name, model in (("dense", dense), ("moe", moe)):
        model.save_pretrained(root / name, max_shard_size=SHARD_SIZE)
    return {"dense": (root / "dense", dense), "moe": (root / "moe", moe)}


@pytest.mark.parametrize(
    "kind, world, layout",
    [
        ("dense", 2, dict(dp_shard=2)),
        ("dense", 2, dict(tp=2, dp_shard=1)),
        ("dense", 4, dict(tp=2, dp_shard=2)),
        ("moe", 2, dict(ep=2)),
        ("moe", 4, dict(ep=2, dp_shard=4)),
        ("moe", 2, dict(tp=2, dp_shard=1)),
        ("moe", 4, dict(tp=2, ep=2, dp_shard=2)),
    ],
    ids=["dense-fsdp2", "dense-tp2", "dense-tp2xfsdp2", "moe-ep2", "moe-ep2xfsdp2", "moe-tp2", "moe-tp2xfsdp2-ep2"],
)
@pytest.mark.multiprocess
def test_load_into_layout_and_save_back(checkpoints, tmp_path, kind, world, layout):
    source, hf_model = checkpoints[kind]
    target = tmp_path / "saved"
    run_ranks(_load_and_save, world, str(source), layout, str(target))
    same_files(target, tmp_path / "saved-single")
    reloads_bit_exactly(target, hf_model)


@pytest.mark.parametrize(
    "key, shape, index, dtype, direct",
    [
        ("model.embed_tokens.weight", (160, 32), (slice(40, 80), slice(0, 32)), torch.float32, True),
        ("model.layers.1.mlp.experts.gate_up_proj", (8, 32, 32), (slice(2, 6), slice(0, 32), slice(0, 32)), torch.float32, True),
        ("model.layers.2.mlp.experts.down_proj", (8, 32, 16), None, torch.float32, True),
        ("model.layers.1.mlp.experts.gate_up_proj", (8, 32, 32), (slice(0, 8), slice(16, 32), slice(0, 32)), torch.float32, False),
        ("lm_head.weight", (160, 32), (slice(80, 160), slice(0, 32)), torch.bfloat16, False),
    ],
    ids=["embedding-rows", "expert-rows", "experts-whole", "expert-columns", "cast"],
)
def test_read_native_into_equals_read_native(checkpoints, monkeypatch, key, shape, index, dtype, direct):
    """Row ranges are read straight into the destination (no memory map); other cases copy."""
    from ernie45.checkpoint.hf_adapter import read_native, read_native_into

    files = CheckpointFiles(checkpoints["moe"][0])
    expected = read_native(files, key, shape, index).to(dtype)
    files.close()
    out = torch.full_like(expected, float("nan"))
    if direct:
        monkeypatch.setattr(CheckpointFiles, "_mapped", lambda *_: pytest.fail("memory-mapped read"))
    read_native_into(files, key, shape, out, index)
    assert torch.equal(out, expected)
