"""Bad input is refused with one line naming the file/key, the value and what is valid: recipe YAML
(alias bombs, self-references), every numeric recipe key (fuzzed), model config values, the
machine's cores, dataset records, and the generate/chat command line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from builders import HELLASWAG, load_tokenizer
from pydantic import BaseModel
from transformers import Ernie4_5Config, Ernie4_5_MoeConfig
from typer.testing import CliRunner

import ernie45
from ernie45.cli import app
from ernie45.evaluation import load_hellaswag
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


@pytest.mark.slow  # a fresh Python process: importing torch takes ~5 s
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
        ("hidden_act", "gelu", "hidden_act='gelu': ERNIE 4.5's feed-forward and experts are SwiGLU"),
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


def _checkpoint_with(source: Path, target: Path, **values) -> Path:
    """A copy of the checkpoint ``source`` whose config.json has ``values`` written over it."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **values}))
    return target


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(num_attention_heads=0), "num_attention_heads=0 must be an integer >= 1"),
        (dict(hidden_size=-8), "hidden_size=-8 must be an integer >= 1"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0 must be a finite number > 0"),
    ],
)
def test_impossible_values_in_config_json_are_named_with_the_file(tiny_lm_dir, tmp_path, values, message):
    bad = _checkpoint_with(tiny_lm_dir, tmp_path / "bad", **values)
    expected = f"{bad / 'config.json'}: {message}"
    with pytest.raises(ValueError) as info:
        ernie45.from_pretrained(bad)
    assert str(info.value).startswith(expected)
    result = _cli("generate", "--model", str(bad), "--prompt", "x", "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {expected}")
    assert len(result.stderr.splitlines()) == 1


def test_finetune_from_a_config_json_with_zero_heads_stops_before_building(tiny_lm_dir, tmp_path):
    bad = _checkpoint_with(tiny_lm_dir, tmp_path / "bad", num_attention_heads=0)
    data = tmp_path / "sft.jsonl"
    data.write_text(SFT_LINE * 32)
    result = _cli(
        "finetune", "--model._target_=ernie45.from_pretrained", f"--model.pretrained_model_name_or_path={bad}",
        "--model.config=null", "--tokenizer._target_=transformers.AutoTokenizer.from_pretrained",
        "--tokenizer.vocab_size=null", "--dataset._target_=ernie45.training.data.SFTDataset",
        f"--dataset.path_or_dataset={data}", "--dataset.num_examples=null", "--dataset.seed=null",
        "--validation_dataset=null", f"--output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {bad / 'config.json'}: num_attention_heads=0 must be an integer >= 1\n"


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
    ("step_scheduler.skip_nonfinite_steps", 0),  # = stop at the first non-finite step
    ("moe.aux_loss_coef", 0), ("moe.aux_loss_coef", 1e30), ("moe.bias_update_rate", 0), ("moe.bias_update_rate", 1e30),
    ("model.config.moe_num_shared_experts", 0), ("model.config.moe_layer_start_index", 0),
    ("model.config.moe_layer_end_index", 0), ("model.config.moe_layer_end_index", -1),
    ("model.config.router_aux_loss_coef", 0), ("model.config.router_aux_loss_coef", 1e30),
    ("packed_sequence.packed_sequence_size", 0),  # = no packing
    ("peft.dropout", 0), ("peft.alpha", 1e30),  # no dropout; a huge adapter scale (finite; as PEFT allows)
    ("dpo.label_smoothing", 0), ("dpo.sft_loss_ratio", 0),  # the defaults
    ("dpo.beta", 1e30),  # finite: the sigmoid loss becomes a step on the margin's sign
    ("dpo.sft_loss_ratio", 1e30),  # finite: the NLL term dominates
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
    preference = read_yaml(ROOT / "examples" / "dpo_default.yaml")  # NOTE: dpo keys need preference data
    keys = numeric_keys()
    assert len(keys) > 40 and "dist_env.cpu_threads" in keys and "model.config.moe_k" in keys
    accepted = set()
    for key in keys:
        if key.startswith("model.config.") and "config" not in raw["model"]:
            continue
        base = preference if key.startswith("dpo.") else raw
        for value in BAD_EVERYWHERE:
            assert _outcome(base, key, value) is not None, f"--{key}={value!r} was accepted"
        for value in MAYBE_MEANINGFUL:
            if _outcome(base, key, value) is None:
                accepted.add((key, value))
    assert accepted <= ACCEPTED, sorted(accepted - ACCEPTED)


# ----- dataset records -------------------------------------------------------------------------
HELLASWAG_LINE = '{"ctx": "A man is on a roof. he", "endings": ["a", "b", "c", "d"], "label": 3}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1.5}', "label=1.5 must index one of its 4 endings (an integer 0..3)"),
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "label=4 must index one of its 4 endings (an integer 0..3)"),
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": true}', "label=True must index one of its 4 endings"),
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}', "label='' must index one of its 4 endings"),  # the hub's test split
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": NaN}', "label=nan must index one of its 4 endings"),
        ('{"ctx": null, "endings": ["a", "b"], "label": 0}', "ctx must be a string, got null"),
        ('{"ctx": "x", "endings": "abcd", "label": 0}', "endings must be a non-empty list of strings, got a string"),
        ('{"ctx": "x", "endings": ["a", 2], "label": 0}', "endings must be a non-empty list of strings, got a list"),
        ('{"activity_label": "Roof", "ctx_a": "x", "ctx_b": 7, "endings": ["a"], "label": 0}', "ctx_b must be a string, got a number"),
    ],
)
def test_bad_hellaswag_fields_name_file_line_and_field(tmp_path, line, message):
    data = tmp_path / "hs.jsonl"
    data.write_text(HELLASWAG_LINE + "\n" + line + "\n")  # the blank line still counts: the bad record is line 3
    with pytest.raises(ValueError) as info:
        load_hellaswag(data)
    assert str(info.value) == f"{data}:3: {message}" + str(info.value).split(message, 1)[1]


def test_hellaswag_labels_may_be_digit_strings_as_in_the_hub_copy(tmp_path):
    data = tmp_path / "hs.jsonl"
    data.write_text(HELLASWAG_LINE.replace('"label": 3', '"label": "2"'))
    assert load_hellaswag(data)[0].label == 2


def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path, tiny_lm_dir):
    data = tmp_path / "hs.jsonl"
    data.write_bytes(HELLASWAG_LINE.encode() + HELLASWAG_LINE.replace("roof", "caf\u00e9").encode("latin-1"))
    result = _cli("eval", "hellaswag", "--model", str(tiny_lm_dir), "--data", str(data), "--output", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    column = HELLASWAG_LINE.index("roof") + 4  # 1-based, after "caf"
    assert result.stderr == f"error: {data}:2 is not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8\n"


SFT_LINE = '{"prompt": "2+2=", "completion": " 4"}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": null}', "completion must be a string, got null"),
        ('{"prompt": 5, "completion": "b"}', "prompt must be a string, got a number"),
        ('{"messages": "hi"}', "messages must be a non-empty list of {role, content} objects, got a string"),
        ('{"messages": []}', "messages must be a non-empty list of {role, content} objects, got a list"),
        ('{"messages": [["user", "hi"]]}', "messages[0] must be an object with role and content, got a list"),
        ('{"messages": [{"role": "user", "content": null}]}', "messages[0].content must be a string, got null"),
        ('{"prompt": "a"}', "needs prompt + completion, or messages; it has ['prompt']"),
    ],
)
def test_bad_sft_fields_name_file_line_and_field(tmp_path, line, message):
    from ernie45.training.config import DatasetConfig
    from ernie45.training.data import load_records

    data = tmp_path / "sft.jsonl"
    data.write_text(SFT_LINE + line + "\n")
    config = DatasetConfig(_target_="ernie45.training.data.SFTDataset", path_or_dataset=str(data))
    with pytest.raises(ValueError) as info:
        load_records(config)
    assert str(info.value) == f"{data}:2{'' if message.startswith('needs') else ':'} {message}"


def test_finetune_on_sft_data_with_a_null_field_or_latin1_bytes_is_one_line(tmp_path, tiny_lm_dir):
    source = (
        "--model._target_=ernie45.from_pretrained", f"--model.pretrained_model_name_or_path={tiny_lm_dir}",
        "--model.config=null", "--tokenizer._target_=transformers.AutoTokenizer.from_pretrained",
        "--tokenizer.vocab_size=null", "--dataset._target_=ernie45.training.data.SFTDataset",
        "--dataset.num_examples=null", "--dataset.seed=null", "--validation_dataset=null",
    )  # fmt: skip
    data = tmp_path / "sft.jsonl"
    for content, message in [
        ((SFT_LINE + '{"prompt": "3+3=", "completion": null}\n').encode(), f"{data}:2: completion must be a string, got null"),
        (SFT_LINE.encode() + SFT_LINE.replace("2+2", "caf\u00e9").encode("latin-1"), f"{data}:2 is not UTF-8 text"),
    ]:
        data.write_bytes(content)
        result = _cli("finetune", *source, f"--dataset.path_or_dataset={data}", f"--output_dir={tmp_path / 'run'}")
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1
        assert "Traceback" not in result.output


# ----- generate / chat ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (("--temperature", "nan"), "--temperature nan must be >= 0 and finite (0 = greedy)"),
        (("--temperature", "inf"), "--temperature inf must be >= 0 and finite (0 = greedy)"),
        (("--temperature", "-0.5"), "--temperature -0.5 must be >= 0 and finite (0 = greedy)"),
        (("--temperature", "0.7", "--top-p", "0"), "top_p=0.0 must be in (0, 1]"),
        (("--temperature", "0.7", "--top-p", "nan"), "top_p=nan must be in (0, 1]"),
        (("--top-p", "1.5"), "top_p=1.5 must be in (0, 1]"),  # greedy still checks it
        (("--top-k", "0"), "top_k=0 must be an integer >= 1"),
        (("--max-new-tokens", "0"), "--max-new-tokens 0 must be >= 1"),
        (("--seed", str(2**70)), f"--seed {2**70} is out of range; use an integer between -2**63 and 2**63 - 1"),
    ],
)
def test_bad_sampling_options_are_refused_before_the_model_loads(tmp_path, args, message):
    # NOTE: --model does not exist: the option is refused first, so nothing was loaded.
    result = _cli("generate", "--model", str(tmp_path / "absent"), "--prompt", "x", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("temperature", [math.inf, math.nan])
def test_the_generate_api_refuses_a_temperature_that_is_not_finite(temperature):
    from builders import dense_model

    # NOTE: inf used to sample uniformly (logits / inf = 0), silently
    with pytest.raises(ValueError, match=rf"^temperature={temperature} must be a number > 0 and finite"):
        dense_model().generate(torch.tensor([[5, 6]]), do_sample=True, temperature=temperature, max_new_tokens=2)


def test_a_kv_cache_beyond_all_memory_is_refused_not_a_failed_allocation(tiny_lm_dir):
    for mode in (["--prompt", "x"], ["--chat"]):
        result = _cli("generate", "--model", str(tiny_lm_dir), *mode, "--max-new-tokens", str(10**13), "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert f"--max-new-tokens {10**13} needs a " in result.stderr and "GiB of host memory here" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ") and result.exception.__class__ is SystemExit


def _greedy(model_dir: Path, text: str, max_new_tokens: int) -> str:
    model, tokenizer = ernie45.from_pretrained(model_dir), load_tokenizer(model_dir)
    ids = tokenizer.encode(text)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.mark.slow  # a fresh Python process: importing torch takes ~5 s
def test_a_prompt_that_is_not_utf8_is_decoded_with_replacement_and_a_warning(tiny_lm_dir):
    run = _python("generate", "--model", str(tiny_lm_dir), "--prompt", b"caf\xe9 au lait", "--max-new-tokens", "6", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    # NOTE: only the first line: libraries may log their own notices after it
    assert run.stderr.decode().splitlines()[0] == (
        "warning: --prompt is not valid UTF-8; its undecodable bytes were replaced with U+FFFD"
    )
    assert run.stdout.decode() == _greedy(tiny_lm_dir, "caf\ufffd au lait", 6) + "\n"


def test_chat_input_that_is_not_utf8_is_replaced_with_a_warning(tiny_lm_dir):
    args = ("generate", "--model", str(tiny_lm_dir), "--chat", "--max-new-tokens", "6", "--device", "cpu")
    bad = _cli(*args, stdin=b"hello \xff there\n\n")
    assert bad.exit_code == 0, bad.output
    hint = "(a blank line, /exit or Ctrl-D ends the chat)\n"
    assert bad.stderr == hint + "warning: this line of input is not valid UTF-8; its undecodable bytes were replaced with U+FFFD\n"
    clean = _cli(*args, stdin="hello \ufffd there\n\n".encode())
    assert clean.exit_code == 0 and clean.stderr == hint
    assert bad.stdout == clean.stdout and bad.stdout.startswith("User: Assistant: ")


def test_running_past_max_position_embeddings_warns_once_with_the_fix(tiny_lm_dir):
    limit = 256  # the tiny model's max_position_embeddings
    result = _cli("generate", "--model", str(tiny_lm_dir), "--prompt", "A man is", "--max-new-tokens", "300", "--device", "cpu")
    assert result.exit_code == 0, result.output
    prompt_len = len(load_tokenizer(tiny_lm_dir).encode("A man is"))
    assert result.stderr == (
        f"warning: the prompt ({prompt_len} tokens) + --max-new-tokens 300 = {prompt_len + 300} positions pass the model's "
        f"max_position_embeddings={limit}; the output may degrade beyond it: pass --max-new-tokens {limit - prompt_len} or less\n"
    )
    chat = _cli("generate", "--model", str(tiny_lm_dir), "--chat", "--max-new-tokens", "250", "--device", "cpu",
                stdin="hello there\nhow are you?\nand then?\n\n")  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert chat.stderr.count("warning: ") == 1 and "max_position_embeddings=256" in chat.stderr
    short = _cli("generate", "--model", str(tiny_lm_dir), "--prompt", "A man is", "--max-new-tokens", "4", "--device", "cpu")
    assert short.exit_code == 0 and short.stderr == ""


@pytest.mark.parametrize(
    "command, options",
    [(["generate"], ["--prompt", "x"]), (["eval", "hellaswag"], ["--limit", "1", "--data", str(HELLASWAG)])],
)
def test_a_model_without_tokenizer_files_says_so_and_how_to_pass_one(tiny_lm_dir, tmp_path, command, options):
    bare = tmp_path / "model_only"
    ernie45.from_pretrained(tiny_lm_dir).save_pretrained(bare)
    options = [*options, "--device", "cpu"] + (["--output", str(tmp_path / "r.json")] if command[0] == "eval" else [])
    result = _cli(*command, "--model", str(bare), *options)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: no tokenizer could be loaded from {bare}: it holds none of the tokenizer files ['tokenizer.json', "
        "'tokenizer_config.json', 'tokenizer.model', 'vocab.json']; pass --tokenizer DIR, the directory of the tokenizer "
        "the model was trained with\n"
    )
    assert "sentencepiece" not in result.output
    fixed = _cli(*command, "--model", str(bare), "--tokenizer", str(tiny_lm_dir), *options)
    assert fixed.exit_code == 0, fixed.output
