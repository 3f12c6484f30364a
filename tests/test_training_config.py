"""Recipe config: typed sections, clear errors naming the key, the _target_ allowlist, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from ernie45.training.config import (
    DEFAULT_RECIPE,
    ConfigError,
    RecipeConfig,
    apply_overrides,
    load_recipe,
    parse_overrides,
    read_yaml,
    validate,
)

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_embedded_default_and_every_example_validate():
    assert isinstance(load_recipe(), RecipeConfig)
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        config = load_recipe(path)
        assert config.dataset.target == "ernie45.training.data.HellaSwag" or config.dpo is not None, path  # dpo: pairs


def test_reference_recipe_names_map_to_ours_and_fit_eight_gpus():
    import torch

    from ernie45.training.components import parallel_config
    from ernie45.training.runtime import Runtime

    config = load_recipe(next(p for p in EXAMPLES if p.name == "ernie4_5_21b_a3b_hellaswag.yaml"))
    assert config.model.target == "ernie45.from_pretrained"
    assert config.loss_fn.target == "ernie45.training.loss.MaskedCrossEntropy"
    assert config.distributed.ep_size == 8
    assert config.backend_fields()["experts"] == "torch_mm"
    eight = Runtime(rank=0, world_size=8, local_rank=0, device=torch.device("cuda"))
    for name in ("ernie4_5_0p3b_hellaswag.yaml", "ernie4_5_21b_a3b_hellaswag.yaml"):
        layout = parallel_config(load_recipe(EXAMPLES[0].parent / name), eight)
        assert layout.resolve(8).data_parallel == 8 and layout.param_dtype == torch.bfloat16, name


def test_overrides_are_parsed_as_yaml_and_nest():
    overrides = parse_overrides(["--step_scheduler.max_steps=7", "--optimizer.betas=[0.8, 0.9]", "--output_dir=x"])
    assert overrides == {"step_scheduler.max_steps": 7, "optimizer.betas": [0.8, 0.9], "output_dir": "x"}
    raw = apply_overrides({"step_scheduler": {"max_steps": 1}}, overrides)
    assert raw["step_scheduler"]["max_steps"] == 7 and raw["optimizer"]["betas"] == [0.8, 0.9]
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["--step_scheduler.max_steps"])
    with pytest.raises(ConfigError, match="step_scheduler.max_steps is a value"):
        apply_overrides({"step_scheduler": {"max_steps": 1}}, {"step_scheduler.max_steps.x": 1})


def _default_with(overrides: dict) -> RecipeConfig:
    return validate(apply_overrides(read_yaml(DEFAULT_RECIPE), overrides))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"step_scheduler.global_batch_sze": 4}, ["step_scheduler.global_batch_sze: unknown key", "global_batch_size"]),
        ({"optimizerr.lr": 1.0}, ["optimizerr: unknown key", "step_scheduler"]),
        ({"step_scheduler.max_steps": "many"}, ["step_scheduler.max_steps", "integer", "'many'"]),
        ({"step_scheduler.max_steps": -3}, ["step_scheduler.max_steps", "greater than 0"]),
        ({"step_scheduler.local_batch_size": 5}, ["global_batch_size=16 must be a multiple of local_batch_size=5"]),
        ({"optimizer._target_": "os.system"}, ["optimizer._target_", "'os.system' is not an allowed optimizer", "torch.optim.AdamW"]),
        ({"dataset._target_": "evil.module.Dataset"}, ["dataset._target_", "configs never import arbitrary code"]),
        ({"model.torch_dtype": "float8"}, ["model.torch_dtype", "'float32'", "'bfloat16'"]),
        ({"optimizer.betas": [0.9, 1.5]}, ["optimizer.betas", "[0, 1)"]),
        ({"distributed.pipeline.pp_microbatch_size": 0}, ["distributed.pipeline.pp_microbatch_size", "greater than 0"]),
        ({"loss_fn.chunk_size": 64}, ["loss_fn", "chunk_size is only for"]),
        ({"lr_scheduler.min_lr": 1.0}, ["lr_scheduler.min_lr=1.0 must not exceed optimizer.lr=0.003"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_valid(overrides, expected):
    with pytest.raises(ConfigError) as info:
        _default_with(overrides)
    for text in expected:
        assert text in str(info.value)


def test_backend_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="either as a top-level `backend` section or as `model.backend`"):
        _default_with({"backend.attn": "sdpa", "model.backend.attn": "eager"})


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {_target_: ernie45.from_pretrained, pretrained_model_name_or_path: missing-dir}\n"
        "dataset: {_target_: ernie45.training.data.SFTDataset, path_or_dataset: data.jsonl}\n"
    )
    config = load_recipe(recipe)
    assert config.dataset.path_or_dataset == str(data)
    assert config.model.pretrained_model_name_or_path == "missing-dir"  # nothing there: left as written


def test_layout_checks_against_the_number_of_ranks():
    import torch

    from ernie45.training.components import parallel_config
    from ernie45.training.runtime import Runtime

    two_ranks = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"global_batch_size=16 must be a multiple of local_batch_size=16 x 2 data-parallel ranks"):
        parallel_config(_default_with({"step_scheduler.local_batch_size": 16}), two_ranks)
    with pytest.raises(ConfigError, match=r"distributed.dp_size=4 does not fit 2 ranks"):
        parallel_config(_default_with({"distributed.dp_size": 4}), two_ranks)
    fused_tp = {"distributed.tp_size": 2, "loss_fn._target_": "ernie45.training.loss.FusedLinearCrossEntropy"}
    with pytest.raises(ConfigError, match="FusedLinearCrossEntropy does not support distributed.tp_size > 1"):
        parallel_config(_default_with(fused_tp), two_ranks)
    layout = parallel_config(_default_with({"distributed.ep_size": 2}), two_ranks)
    assert (layout.ep, layout.tp, layout.param_dtype) == (2, 1, None)  # fp32 compute: no FSDP2 cast


def test_pipeline_keys_are_checked_before_anything_is_built():
    import torch

    from ernie45.training.components import parallel_config
    from ernie45.training.runtime import Runtime

    two_ranks = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    pipeline = {"distributed.pp_size": 2, "distributed.pipeline.pp_schedule": "interleaved_1f1b",
                "distributed.pipeline.layers_per_stage": [1, 1, 1, 1]}
    layout = parallel_config(_default_with(pipeline), two_ranks)
    assert (layout.pp, layout.pp_schedule, layout.layers_per_stage, layout.dp_shard) == (2, "Interleaved1F1B", (1, 1, 1, 1), -1)
    with pytest.raises(ConfigError, match=r"pipeline.pp_schedule\b.*unknown pipeline schedule 'zigzag'; use one of GPipe, 1F1B"):
        _default_with({"distributed.pipeline.pp_schedule": "zigzag"})
    with pytest.raises(ConfigError, match=r"local_batch_size=8 must be a multiple of distributed.pipeline.pp_microbatch_size=3"):
        parallel_config(_default_with({"distributed.pp_size": 2, "distributed.pipeline.pp_microbatch_size": 3}), two_ranks)
    with pytest.raises(ConfigError, match=r"tp_size=1 x cp_size=1 x pp_size=4 must divide the world size 2"):
        parallel_config(_default_with({"distributed.pp_size": 4}), two_ranks)


def test_activation_checkpointing_in_one_process_recomputes_every_block():
    """``distributed.activation_checkpointing`` is honoured without a process group too (was ignored)."""
    import torch
    from torch.distributed._composable import checkpoint

    from ernie45.training.components import build_model
    from ernie45.training.runtime import Runtime

    config = load_recipe(overrides={"distributed": {"activation_checkpointing": True}})
    tokenizer = type("Tok", (), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "__len__": lambda self: 64})()
    model, _ = build_model(config, tokenizer, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert all(checkpoint.state(block) is not None for block in model.model.layers)
    plain, _ = build_model(load_recipe(), tokenizer, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert all(checkpoint.state(block) is None for block in plain.model.layers)
