"""Bad layouts fail early with errors that name the value and what would be valid; capabilities
tell the truth about what the scale-out code supports."""

from __future__ import annotations

import pytest
import torch

import ernie45
from builders import tiny_dense_config, tiny_moe_config
from dist_harness import run_ranks
from ernie45 import Ernie4_5ForCausalLM
from ernie45.distributed import LayoutError, ParallelConfig, check_model_fits
from ernie45.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(tp=0), LayoutError, "ParallelConfig.tp=0 must be a positive integer"),
        (dict(dp_shard=-2), LayoutError, "dp_shard=-2 must be a positive integer or -1"),
        (dict(ep=1.5), LayoutError, "ParallelConfig.ep=1.5"),
        (dict(cp=0), LayoutError, "ParallelConfig.cp=0 must be a positive integer"),
    ],
)
def test_invalid_sizes_are_refused(fields, error, message):
    with pytest.raises(error, match=message):
        ParallelConfig(**fields)


@pytest.mark.parametrize(
    "fields, world, message",
    [
        (dict(tp=4), 6, "world size 6 is not divisible by .*tp=4"),
        (dict(dp_shard=3, tp=2), 4, r"world size 4 is not the product of the parallel sizes .*6 ranks"),
        (dict(ep=3), 4, r"ep=3 must divide the data-parallel ranks .* = 4"),
        (dict(ep=4), 2, r"ep=4 must divide the data-parallel ranks .* = 2"),
    ],
)
def test_layouts_that_do_not_fit_the_world_are_refused(fields, world, message):
    with pytest.raises(LayoutError, match=message):
        ParallelConfig(**fields).resolve(world)


def test_resolve_fills_dp_shard_and_folds_ep_onto_data_parallel_ranks():
    layout = ParallelConfig(dp_replicate=2, ep=4).resolve(8)
    assert (layout.dp_shard, layout.data_parallel, layout.ep_shard) == (4, 8, 2)
    assert ParallelConfig(tp=2).resolve(8).dp_shard == 4


@pytest.mark.parametrize(
    "config, fields, message",
    [
        (tiny_dense_config(num_attention_heads=6, num_key_value_heads=6, head_dim=8), dict(tp=4), "num_attention_heads=6"),
        (tiny_dense_config(), dict(tp=4), "num_key_value_heads=2"),
        (tiny_dense_config(vocab_size=161), dict(tp=2), "vocab_size=161"),
        (tiny_dense_config(), dict(ep=2), "ep=2 needs a mixture-of-experts model"),
        (tiny_moe_config(), dict(ep=3), "ep=3 must divide moe_num_experts=8"),
        (tiny_moe_config(moe_intermediate_size=15), dict(tp=2), "moe_intermediate_size x moe_num_shared_experts=15"),
    ],
)
def test_layouts_that_do_not_fit_the_model_are_refused(config, fields, message):
    with pytest.raises(LayoutError, match=message):
        check_model_fits(ParallelConfig(**fields), config)


def test_parallel_load_without_a_process_group_says_how_to_launch(dense_checkpoint, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        ernie45.from_pretrained(dense_checkpoint[0], parallel=ParallelConfig())


def _bad_layouts_on_two_ranks(rank: int, world: int, path: str) -> None:
    with pytest.raises(LayoutError, match="tp=4 must divide num_key_value_heads=2"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(tp=4))
    with pytest.raises(LayoutError, match="world size 2 is not divisible by dp_replicate=4"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(dp_replicate=4))
    with pytest.raises(LayoutError, match="ep=2 needs a mixture-of-experts model"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(ep=2))
    with pytest.raises(LayoutError, match="world size 2 is not the product"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(dp_shard=4))


@pytest.mark.multiprocess
def test_bad_layouts_fail_on_every_rank_before_loading(dense_checkpoint):
    run_ranks(_bad_layouts_on_two_ranks, 2, str(dense_checkpoint[0]))


def _load_under_torchrun_environment(rank: int, world: int, path: str) -> None:
    assert not torch.distributed.is_initialized()
    model = ernie45.from_pretrained(path, dtype=torch.float32, parallel=ParallelConfig(param_dtype=torch.float32))
    assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == world
    assert model.model.layers[0].self_attn.q_proj.weight.device_mesh.mesh_dim_names == ("dp_shard",)


@pytest.mark.multiprocess
def test_parallel_load_starts_the_process_group_from_torchrun_environment(dense_checkpoint):
    run_ranks(_load_under_torchrun_environment, 2, str(dense_checkpoint[0]), init=False)


def test_capabilities_report_the_supported_parallelisms():
    dense = Ernie4_5ForCausalLM.get_capabilities(tiny_dense_config())
    moe = Ernie4_5_MoeForCausalLM.get_capabilities(tiny_moe_config())
    for caps in (dense, moe):
        assert caps.supports_tp and caps.supports_fsdp and caps.supports_activation_checkpointing
        assert caps.supports_cp and caps.supports_pp
        assert caps.supports_kv_cache  # generation.py
    assert moe.supports_ep and not dense.supports_ep
