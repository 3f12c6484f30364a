"""Bad input is refused with one line naming the file/key, the value and what is valid: recipe YAML
(alias bombs, self-references), every numeric recipe key (fuzzed), model config values, the
machine's cores, dataset records, and the generate/chat command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from transformers import Ernie4_5Config, Ernie4_5_MoeConfig
from typer.testing import CliRunner

from ernie45.cli import app
from ernie45.models.validation import check_model_config
from ernie45.training.config import (
    DEFAULT_RECIPE,
    MAX_YAML_NODES,
    ConfigError,
    RecipeConfig,
    apply_overrides,
    load_recipe,
    parse_overrides,
    read_yaml,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _cli(*args: str, stdin: str | bytes | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


def _python(*args: str | bytes, stdin: bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ernie45.cli ARGS`` in a fresh process (bytes arguments are passed as they are)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ernie45.cli", *args], input=stdin, capture_output=True, timeout=timeout, env=env, cwd=ROOT
    )


# ----- YAML: alias bombs and self-references ---------------------------------------------------
def _alias_bomb(levels: int) -> str:
    """A recipe whose model.config holds 9**levels strings through nested anchors, in ~100 bytes a level."""
    lines = ['    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "model:\n  _target_: ernie45.from_config\n  config:\n    model_type: ernie4_5\n" + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_naming_the_file_and_nothing_is_written(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_alias_bomb(levels=10))  # 9**10 = 3.5e9 strings once expanded; the file is 1 kB
    start = time.perf_counter()
    run = _python("finetune", str(recipe), f"--output_dir={tmp_path / 'run'}", timeout=120)
    assert run.returncode == 2, run.stderr
    (error,) = run.stderr.decode().strip().splitlines()
    prefix, _, rest = error.partition(" YAML nodes through its aliases")
    assert prefix.startswith(f"error: {recipe} expands to ") and int(prefix.split()[-1].replace(",", "")) > 9**10
    assert rest == f" (&anchor / *alias); at most {MAX_YAML_NODES:,} are read: write the values out"
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 100  # the import of torch dominates; the check itself is instant


def test_anchors_in_a_real_sized_recipe_still_work(tmp_path):
    recipe = tmp_path / "anchors.yaml"
    text = DEFAULT_RECIPE.read_text().replace("  lr: 3.0e-3\n", "")
    recipe.write_text(text.replace("optimizer:\n", "optimizer:\n  <<: &peak {lr: 3.0e-3}\n", 1))
    assert load_recipe(recipe).optimizer.lr == 3.0e-3


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: &m {config: [*m]}\n", "{recipe}: an alias refers to a node that contains it; write the values out"),
        ("model: [1,\n", "{recipe} is not valid YAML (line 2, column 1): expected the node content"),
        ("model: " + "[" * 5000 + "]" * 5000 + "\n", "{recipe} nests its YAML too deeply to read"),
    ],
)
def test_self_references_broken_and_too_deep_yaml_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = _cli("finetune", str(recipe), f"--output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message.format(recipe=recipe) in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_and_bad_override_yaml_are_named(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("# café\n".encode("latin-1") + DEFAULT_RECIPE.read_bytes())
    with pytest.raises(ConfigError, match=rf"recipe file {recipe} is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        read_yaml(recipe)
    with pytest.raises(ConfigError, match=r"--optimizer.betas is not valid YAML \(line 1, column 5\)"):
        parse_overrides(["--optimizer.betas=[0.9"])
    with pytest.raises(ConfigError, match="--model.config: an alias refers to a node that contains it"):
        parse_overrides(["--model.config=&c {model_type: ernie4_5, x: *c}"])
    bomb = "{a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    for level in range(1, 8):
        previous = "a" if level == 1 else f"a{level - 1}"
        bomb += f", a{level}: &a{level} [" + ", ".join([f"*{previous}"] * 9) + "]"
    with pytest.raises(ConfigError, match="--model.config.big expands to 54,481,013 YAML nodes"):
        parse_overrides(["--model.config.big=" + bomb + "}"])


# ----- the machine's cores ---------------------------------------------------------------------
def test_cpu_threads_beyond_the_machine_are_refused_naming_the_key_and_the_cores(tmp_path):
    cores = os.cpu_count()
    result = _cli("finetune", "--dist_env.cpu_threads=100000", f"--output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2
    assert f"dist_env.cpu_threads: 100000 is more than 4 x the {cores} CPU cores of this machine; use 1..{4 * cores}" in (
        result.stderr
    )
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    assert _default_with({"dist_env.cpu_threads": 4 * cores}).dist_env.cpu_threads == 4 * cores


# ----- model config values ---------------------------------------------------------------------
def _default_with(overrides: dict) -> RecipeConfig:
    return validate(apply_overrides(read_yaml(DEFAULT_RECIPE), overrides))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_attention_heads", 0, "num_attention_heads=0 must be an integer >= 1"),
        ("hidden_size", -8, "hidden_size=-8 must be an integer >= 1"),
        ("hidden_size", "64", "hidden_size='64' must be an integer >= 1"),
        ("num_hidden_layers", True, "num_hidden_layers=True must be an integer >= 1"),
        ("num_attention_heads", 6, "num_attention_heads=6 must be a multiple of num_key_value_heads=4"),
        ("head_dim", 15, "head_dim=15 must be even (rotary embeddings rotate pairs of dimensions)"),
        ("moe_k", 9, "moe_k=9 must be between 1 and moe_num_experts=8"),
        ("moe_k", 0, "moe_k=0 must be an integer >= 1"),
        ("moe_intermediate_size", 0, "moe_intermediate_size=0 must be an integer >= 1"),
        ("moe_num_shared_experts", -1, "moe_num_shared_experts=-1 must be an integer >= 0"),
        ("moe_layer_interval", 0, "moe_layer_interval=0 must be an integer >= 1"),
        ("moe_layer_end_index", -2, "moe_layer_end_index=-2 must be an integer >= 0, or -1 for the last layer"),
        ("rms_norm_eps", math.nan, "rms_norm_eps=nan must be a finite number > 0"),
        ("rms_norm_eps", 0.0, "rms_norm_eps=0.0 must be a finite number > 0"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}, "rope_theta=-1.0 must be a finite number > 0"),
        ("model_type", "llama", "model_type='llama' must be one of ['ernie4_5', 'ernie4_5_moe']"),
    ],
)
def test_model_config_values_are_checked_before_building(key, value, message):
    overrides = {f"model.config.{key}": value}
    if key == "num_attention_heads" and value == 6:
        overrides["model.config.num_key_value_heads"] = 4
    with pytest.raises(ConfigError) as info:
        _default_with(overrides)
    assert str(info.value).splitlines()[1:] == [f"  model.config: {message}" + str(info.value).split(message, 1)[1]]


def test_the_released_shapes_pass_and_transformers_configs_are_checked_too():
    """0.3B and 21B-A3B (DESIGN.md) are valid; a bad value in a transformers config object is named."""
    check_model_config(Ernie4_5Config(hidden_size=1024, num_hidden_layers=18, num_attention_heads=16,
                                      num_key_value_heads=2, head_dim=128, intermediate_size=3072, vocab_size=103424))
    moe = dict(hidden_size=2560, num_hidden_layers=28, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
               moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2, vocab_size=103424)
    check_model_config(Ernie4_5_MoeConfig(**moe))
    with pytest.raises(ValueError, match=r"^moe_k=65 must be between 1 and moe_num_experts=64"):
        check_model_config(Ernie4_5_MoeConfig(**{**moe, "moe_k": 65}))
    with pytest.raises(ValueError, match=r"^num_attention_heads=0 must be an integer >= 1$"):
        check_model_config(Ernie4_5Config(num_attention_heads=0))
    with pytest.raises(ValueError, match=r"^rope_theta=inf must be a finite number > 0$"):
        check_model_config(Ernie4_5Config(rope_parameters={"rope_type": "default", "rope_theta": math.inf}))
    check_model_config({"hidden_size": 64})  # a partial mapping: only what is given is checked


# ----- fuzz: every numeric key of the recipes ---------------------------------------------------
BAD_EVERYWHERE = [math.nan, math.inf, -math.inf, "x", [1]]
MAYBE_MEANINGFUL = [0, -1, 1e30]


def _numeric(annotation) -> bool:
    """Whether a field's type is a number (int, float, a tuple of floats), behind Optional/Annotated."""
    if annotation in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def numeric_keys() -> list[str]:
    """Every numeric key of every section of the schema, plus the numeric model.config keys of the default recipe."""
    keys = []
    for name, field in RecipeConfig.model_fields.items():
        sections = [a for a in typing.get_args(field.annotation) or (field.annotation,) if isinstance(a, type)]
        section = next((a for a in sections if issubclass(a, BaseModel)), None)
        if section is None:
            continue
        keys += [f"{name}.{sub.alias or key}" for key, sub in section.model_fields.items() if _numeric(sub.annotation)]
    model_config = read_yaml(DEFAULT_RECIPE)["model"]["config"]
    keys += [f"model.config.{k}" for k, v in model_config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


# (key, value) pairs that validate and mean something (reviewed one by one; anything else must be a ConfigError)
ACCEPTED = {
    ("dataset.sample_offset", 0), ("validation_dataset.sample_offset", 0),
    ("dataset.seed", 0), ("validation_dataset.seed", 0), ("model.seed", 0), ("rng.seed", 0),
    ("lr_scheduler.lr_warmup_steps", 0), ("lr_scheduler.min_lr", 0), ("optimizer.weight_decay", 0),
    ("optimizer.weight_decay", 1e30),  # decays every weight to 0 in one step: allowed, as in torch
    ("optimizer.lr", 1e30),  # finite; a diverging run is the training-run checks' business
    ("optimizer.eps", 1e30),  # finite; updates become ~0 (torch accepts it too)
    ("clip_grad_norm.max_norm", 1e30),  # = no clipping
    ("moe.aux_loss_coef", 0), ("moe.aux_loss_coef", 1e30), ("moe.bias_update_rate", 0), ("moe.bias_update_rate", 1e30),
    ("model.config.moe_num_shared_experts", 0), ("model.config.moe_layer_start_index", 0),
    ("model.config.moe_layer_end_index", 0), ("model.config.moe_layer_end_index", -1),
    ("model.config.router_aux_loss_coef", 0), ("model.config.router_aux_loss_coef", 1e30),
}  # fmt: skip


def _outcome(raw: dict, key: str, value) -> str | None:
    """None when the recipe validates, else the error, checked to name the key in one line per problem."""
    start = time.perf_counter()
    try:
        validate(apply_overrides(raw, {key: value}))
        return None
    except ConfigError as err:
        message = str(err)
    finally:
        assert time.perf_counter() - start < 5, (key, value)
    problems = message.splitlines()[1:]
    *section, leaf = key.split(".")
    assert problems and all(p.startswith("  ") for p in problems), message
    assert any(".".join(section) in p and leaf in p for p in problems), (key, value, message)
    return message


@pytest.mark.parametrize("recipe", [DEFAULT_RECIPE, ROOT / "examples" / "ernie4_5_0p3b_hellaswag_cpu.yaml"], ids=lambda p: p.stem)
def test_every_numeric_key_takes_only_meaningful_values(recipe):
    raw = read_yaml(recipe)
    keys = numeric_keys()
    assert len(keys) > 40 and "dist_env.cpu_threads" in keys and "model.config.moe_k" in keys
    accepted = set()
    for key in keys:
        if key.startswith("model.config.") and "config" not in raw["model"]:
            continue
        for value in BAD_EVERYWHERE:
            assert _outcome(raw, key, value) is not None, f"--{key}={value!r} was accepted"
        for value in MAYBE_MEANINGFUL:
            if _outcome(raw, key, value) is None:
                accepted.add((key, value))
    assert accepted <= ACCEPTED, sorted(accepted - ACCEPTED)
