"""NeMo AutoModel's ERNIE 4.5 recipes run as written: every section and key of its 21B-A3B and 0.3B
HellaSwag recipes, components that cannot run here replaced by the nearest with a notice (or refused
under --strict), hub ids resolved from the Hugging Face cache offline, YAML 1.2 numbers, and the
wandb / mlflow trackers logging what metrics.jsonl holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import HELLASWAG, hub_cache_snapshot, save_tiny_lm
from typer.testing import CliRunner

from ernie45.cli import app
from ernie45.training.compat import adapt_recipe
from ernie45.checkpoint.hub import hub_snapshot
from ernie45.training.config import ConfigError, load_recipe, load_yaml, parse_overrides
from ernie45.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()

# Every section and key of AutoModel's ernie4_5_21b_a3b_hellaswag.yaml, plus what its 0.3B recipe adds
# (model.attn_implementation, distributed.dp_size: none), with upstream's values.
AUTOMODEL_RECIPE = """\
recipe: TrainFinetuneRecipeForNextTokenPrediction
step_scheduler:
  global_batch_size: 8
  local_batch_size: 1
  ckpt_every_steps: 25
  val_every_steps: 100
  max_steps: 100
  num_epochs: 1
dist_env:
  backend: nccl
  timeout_minutes: 60
rng:
  _target_: nemo_automodel.components.training.rng.StatefulRNG
  seed: 1111
  ranked: true
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: baidu/ERNIE-4.5-21B-A3B-PT
  torch_dtype: bfloat16
  attn_implementation: sdpa
  backend:
    _target_: nemo_automodel.components.models.common.BackendConfig
    attn: te
    linear: torch
    rms_norm: torch_fp32
    experts: torch_mm
    dispatcher: deepep
    rope_fusion: false
    fake_balanced_gate: false
    enable_hf_state_dict_adapter: true
    enable_fsdp_optimizations: true
checkpoint:
  enabled: true
  checkpoint_dir: checkpoints/ernie4_5_21b_a3b_hellaswag/
  model_save_format: safetensors
  save_consolidated: false
distributed:
  strategy: fsdp2
  dp_size: none
  tp_size: 1
  cp_size: 1
  pp_size: 1
  ep_size: 8
  sequence_parallel: false
  activation_checkpointing: true
loss_fn:
  _target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy
dataset:
  _target_: nemo_automodel.components.datasets.llm.hellaswag.HellaSwag
  path_or_dataset: rowan/hellaswag
  split: train
packed_sequence:
  packed_sequence_size: 0
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
  shuffle: true
validation_dataset:
  _target_: nemo_automodel.components.datasets.llm.hellaswag.HellaSwag
  path_or_dataset: rowan/hellaswag
  split: validation
  num_samples_limit: 64
validation_dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
  batch_size: 1
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.95]
  eps: 1e-7
  lr: 1.0e-5
  weight_decay: 0.0
ci:
  recipe_owner: someone
  time: "00:20:00"
  checkpoint_robustness:
    hf_kl_threshold: 5e-3
    tokenizer_name: baidu/ERNIE-4.5-21B-A3B-PT
    dataset.num_samples_limit: 500
"""
HUB_ID = "baidu/ERNIE-4.5-21B-A3B-PT"
# What the test changes: the data (the HellaSwag fixture, validation held out after record 200), and
# the scale (one CPU process instead of 8 GPUs with ep_size 8; two steps; 8 validation examples, since
# bf16 is emulated, slowly, on CPUs without native bf16).
DATA_AND_SCALE = [
    f"--dataset.path_or_dataset={HELLASWAG}",
    f"--validation_dataset.path_or_dataset={HELLASWAG}",
    "--validation_dataset.sample_offset=200",
    "--validation_dataset.num_samples_limit=8",
    "--distributed.ep_size=1",
    "--step_scheduler.max_steps=2",
]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "ernie4_5_21b_a3b_hellaswag.yaml"
    path.write_text(AUTOMODEL_RECIPE)
    return path


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds a tiny random MoE (with a tokenizer) under AutoModel's hub id."""
    home = tmp_path_factory.mktemp("hf_home")
    save_tiny_lm(hub_cache_snapshot(home / "hub", HUB_ID), moe=True)
    return home


# ----- YAML numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("1e-7", 1e-7), ("5e-3", 5e-3), ("1.0e5", 1e5), ("-2E+3", -2000.0), (".5e-1", 0.05)])
def test_exponent_numbers_are_floats_in_files_and_overrides(text, value):
    assert load_yaml(f"eps: {text}", "recipe") == {"eps": value}
    assert parse_overrides([f"--optimizer.eps={text}"]) == {"optimizer.eps": value}


def test_other_scalars_keep_their_yaml_types():
    assert load_yaml("a: 1\nb: 1.5\nc: 1e\nd: e5\ne: '1e-7'\nf: 1_000", "recipe") == {
        "a": 1, "b": 1.5, "c": "1e", "d": "e5", "e": "1e-7", "f": 1000
    }


# ----- keys: honoured or refused with the reason ---------------------------------------------------
def _recipe(recipe_file: Path, *overrides: str, strict: bool = False):
    return load_recipe(recipe_file, parse_overrides(list(overrides)), strict)


def test_every_key_of_the_recipe_is_read(recipe_file):
    config = _recipe(recipe_file)
    assert config.optimizer.eps == 1e-7 and config.rng.ranked and config.model.torch_dtype == "bfloat16"
    assert config.checkpoint.save_consolidated == "false" and config.distributed.dp_size is None
    assert config.packed_sequence.packed_sequence_size == 0 and config.validation_dataset.num_samples_limit == 64
    assert config.backend_fields() == {
        "attn": "sdpa", "linear": "torch", "rms_norm": "torch_fp32", "experts": "torch_mm", "dispatcher": "torch",
        "rope_fusion": False, "fake_balanced_gate": False, "enable_hf_state_dict_adapter": True,
        "enable_fsdp_optimizations": False,
    }  # fmt: skip
    config.build_backend()  # what BackendConfig refuses was replaced


# The compile section of AutoModel's other llm_finetune recipes (baichuan_2_7b_squad.yaml), upstream's text.
AUTOMODEL_COMPILE = """\
compile:
  enabled: false
  mode: "default"  # Options: "default", "reduce-overhead", "max-autotune"
  fullgraph: false
  dynamic: true  # Set to false for better performance with fixed shapes
  backend: null  # Use default backend (inductor)
"""


def test_automodels_compile_section_is_read(tmp_path):
    path = tmp_path / "with_compile.yaml"
    path.write_text(AUTOMODEL_RECIPE + AUTOMODEL_COMPILE)
    assert load_recipe(path).compile.model_dump() == dict(
        enabled=False, mode="default", fullgraph=False, dynamic=True, backend=None, options={}, dynamo_cache_size_limit=256
    )


@pytest.mark.parametrize(
    "given, expected", [(True, "every"), (False, "false"), ("final", "final"), ("every", "every"), ("false", "false")]
)
def test_save_consolidated_takes_automodels_booleans_and_modes(recipe_file, given, expected):
    assert _recipe(recipe_file, f"--checkpoint.save_consolidated={json.dumps(given)}").checkpoint.save_consolidated == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("--checkpoint.save_consolidated=sometimes", "checkpoint.save_consolidated: Input should be 'final', 'every' or 'false'"),
        ("--checkpoint.is_async=true", "checkpoint.is_async: asynchronous checkpointing is not implemented"),
        ("--checkpoint.model_save_format=torch_save", "checkpoint.model_save_format: Input should be 'safetensors'"),
        ("--distributed.sequence_parallel=true", "distributed.sequence_parallel: sequence parallelism is not implemented"),
        ("--wandb.bogus=1", "wandb.bogus: unknown key"),
    ],
)
def test_what_is_not_implemented_is_refused_naming_the_key(recipe_file, override, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(recipe_file, override)


# ----- fallbacks -----------------------------------------------------------------------------------
def test_each_unavailable_component_falls_back_with_one_notice_naming_both(recipe_file):
    notices = _recipe(recipe_file).notices
    for key, given, used in [
        ("model.backend.attn", "'te'", "'sdpa'"),
        ("model.backend.dispatcher", "'deepep'", "'torch'"),
        ("model.backend.enable_fsdp_optimizations", "True", "False"),
        *([("dist_env.backend", "'nccl'", "'gloo'")] if NO_GPU else []),
    ]:
        [line] = [n for n in notices if n.startswith(f"notice: {key}: ")]
        assert f"using {used} instead of {given}" in line and "--strict" in line, line
    assert any("ci: AutoModel's CI settings" in n for n in notices)
    assert any("model.attn_implementation='sdpa' is not used" in n for n in notices)
    assert len(notices) == 5 + NO_GPU


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.backend.attn=te", "model.backend.attn='te'"),
        ("--model.backend.experts=gmm", "model.backend.experts='gmm'"),
        ("--model.backend.dispatcher=deepep", "model.backend.dispatcher='deepep'"),
        ("--loss_fn._target_=nemo_automodel.components.loss.te_parallel_ce.TEParallelCrossEntropy", "loss_fn._target_="),
    ],
)
def test_strict_refuses_instead(recipe_file, override, key):
    # NOTE: everything else that would fall back is set to what runs here, so the error is about ``override``.
    runnable = ["--model.backend.attn=sdpa", "--model.backend.dispatcher=torch", "--model.backend.enable_fsdp_optimizations=false"]
    with pytest.raises(ConfigError, match=f"{key}.*cannot run here.*without --strict ernie45 uses"):
        _recipe(recipe_file, *runnable, "--dist_env.backend=gloo", override, strict=True)


def test_a_kernel_backendconfig_accepts_is_kept_and_the_python_api_stays_strict():
    from ernie45 import BackendConfig

    raw, notices = adapt_recipe({"backend": {"attn": "eager", "experts": "torch"}}, strict=False)
    assert raw["backend"] == {"attn": "eager", "experts": "torch"} and notices == []
    with pytest.raises(ValueError, match="BackendConfig.attn='te' is not available"):
        BackendConfig(attn="te")


def test_transformer_engine_and_chunked_losses_become_masked_cross_entropy():
    for name in ("te_parallel_ce.TEParallelCrossEntropy", "chunked_ce.ChunkedCrossEntropy"):
        raw, [notice] = adapt_recipe({"loss_fn": {"_target_": f"nemo_automodel.components.loss.{name}", "chunk_len": 512}}, False)
        assert raw["loss_fn"] == {"_target_": "ernie45.training.loss.MaskedCrossEntropy"} and name in notice


def test_automodel_model_keywords_drop_its_patch_switches_and_set_transformers_config_fields():
    """AutoModel forwards a model section's other keys to transformers' from_pretrained, which sets config
    fields: here they go to ``model.config``; its switches for patching transformers' code do nothing."""
    section = {
        "_target_": "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained",
        "pretrained_model_name_or_path": HUB_ID,
        "torch_dtype": "bfloat16",
        "use_liger_kernel": True,
        "use_sdpa_patching": True,
        "trust_remote_code": True,
        "max_position_embeddings": 262144,
        "rope_scaling": {"type": "yarn", "factor": 2.0},
    }
    raw, notices = adapt_recipe({"model": section}, strict=True)
    assert raw["model"] == {
        "_target_": section["_target_"],
        "pretrained_model_name_or_path": HUB_ID,
        "torch_dtype": "bfloat16",
        "config": {"max_position_embeddings": 262144, "rope_scaling": {"type": "yarn", "factor": 2.0}},
    }
    assert any(n.startswith("notice: model.use_liger_kernel=True is not used (Liger") for n in notices)
    assert any(n.startswith("notice: model.trust_remote_code=True is not used") for n in notices)
    assert any(n.startswith("notice: model.rope_scaling: set on the model's config") for n in notices) and len(notices) == 5
    with pytest.raises(ConfigError, match=r"model.max_position_embeddings and model.config.max_position_embeddings are both given"):
        adapt_recipe({"model": {"max_position_embeddings": 8, "config": {"max_position_embeddings": 16}}}, False, ConfigError)


# ----- hub ids -------------------------------------------------------------------------------------
@pytest.fixture
def offline_cache(monkeypatch, hf_home):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(offline_cache):
    snapshot = hub_snapshot(HUB_ID, repr(HUB_ID))
    assert snapshot.parent.parent.name == "models--baidu--ERNIE-4.5-21B-A3B-PT" and (snapshot / "config.json").is_file()


def test_a_hub_id_neither_cached_nor_downloadable_is_one_error_naming_it_and_hf_home(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        hub_snapshot("baidu/ERNIE-4.5-0.3B-PT", repr("baidu/ERNIE-4.5-0.3B-PT"))
    message = str(err.value)
    assert "'baidu/ERNIE-4.5-0.3B-PT' is not a local directory; as a hub id" in message and f"HF_HOME={offline_cache}" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="neither a directory nor a hub id"):
        hub_snapshot("./no/such/dir", repr("./no/such/dir"))


def test_a_hub_dataset_without_the_datasets_package_is_one_error(monkeypatch):
    from ernie45.training.data import read_hub

    monkeypatch.setitem(sys.modules, "datasets", None)  # NOTE: import datasets now raises ImportError
    with pytest.raises(ValueError, match=r"'Rowan/hellaswag' is not a local file.*pip install datasets.*HF_HOME="):
        read_hub("Rowan/hellaswag", "train", 10)


# ----- the whole recipe, end to end ----------------------------------------------------------------
def run_finetune(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``ernie45 finetune ARGS`` in a fresh process (so HF_HOME and HF_HUB_OFFLINE are read at import)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "ernie45.cli", "finetune", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_automodels_recipe_runs_with_only_data_and_scale_changed(recipe_file, hf_home, tmp_path):
    out = tmp_path / "run"
    done = run_finetune([str(recipe_file), *DATA_AND_SCALE, f"--output_dir={out}"], {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    notices = [line for line in done.stderr.splitlines() if line.startswith("notice: ")]
    assert any("'sdpa' instead of 'te'" in n for n in notices) and any("'torch' instead of 'deepep'" in n for n in notices)
    assert any(n.startswith("notice: ci:") for n in notices)
    assert len([line for line in done.stderr.splitlines() if "instead of 'te'" in line]) == 1, "one notice, printed once"
    assert "MoE aux-loss coefficient 0 (the model config: router_aux_loss_coef=0.001 counts only when" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["hf_dir"] is None  # save_consolidated: false
    assert summary["multiple_choice_after"]["num_examples"] == 8
    assert (out / "checkpoints" / "ernie4_5_21b_a3b_hellaswag" / "step_2").is_dir()
    resolved = (out / "config.yaml").read_text()
    assert "ERNIE-4.5-21B-A3B-PT/snapshots/" in resolved and "dispatcher: torch" in resolved

    strict = run_finetune([str(recipe_file), *DATA_AND_SCALE, f"--output_dir={tmp_path / 'strict'}", "--strict"], {})
    assert strict.returncode == 2 and "model.backend.attn='te' cannot run here" in strict.stderr, strict.stderr[-2000:]


# ----- runs of the 0.3B CPU example -----------------------------------------------------------------
def tracked_run(tmp_path: Path, *args: str, out: Path | None = None) -> Path:
    """Two steps of the 0.3B CPU example on a tiny dense model and the fixture, with ``args``."""
    model = tmp_path / "model"
    if not model.exists():
        save_tiny_lm(model)
    out = out or tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "finetune", str(ROOT / "examples" / "ernie4_5_0p3b_hellaswag_cpu.yaml"),
            f"--model.pretrained_model_name_or_path={model}", f"--dataset.path_or_dataset={HELLASWAG}",
            f"--validation_dataset.path_or_dataset={HELLASWAG}", "--validation_dataset.sample_offset=200",
            "--step_scheduler.max_steps=2", f"--output_dir={out}", *args,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


def test_save_consolidated_every_exports_each_checkpoint_and_resume_still_works(tmp_path):
    from transformers import AutoModelForCausalLM

    every = ["--checkpoint.save_consolidated=every", "--step_scheduler.ckpt_every_steps=1", "--checkpoint.keep_last_n=1"]
    out = tracked_run(tmp_path, *every)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # step_1 pruned, its hf/ with it
    exported = out / "checkpoints" / "step_2" / "hf"
    reference = AutoModelForCausalLM.from_pretrained(str(exported))
    final = AutoModelForCausalLM.from_pretrained(str(out / "hf"))  # the same weights (the example computes in float32)
    for (name, got), (_, want) in zip(reference.state_dict().items(), final.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    resumed = tracked_run(tmp_path, *every, "--step_scheduler.max_steps=3", "--lr_scheduler.lr_decay_steps=2", "--resume", out=out)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 2


def test_packed_sequence_packs_the_training_examples(tmp_path):
    from transformers import AutoTokenizer

    from ernie45.training.data import pack_examples, tokenize_records

    out = tracked_run(tmp_path, "--packed_sequence.packed_sequence_size=256", "--checkpoint.enabled=false")
    config = load_recipe(out / "config.yaml")
    records = config.dataset.build().load()
    examples = tokenize_records(config.dataset, records, AutoTokenizer.from_pretrained(tmp_path / "model"))
    rows = pack_examples(examples, 256)
    assert len(rows) < len(examples) / 2
    [first] = [e for e in read_metrics(out / "metrics.jsonl") if e.get("step") == 1 and "loss" in e]
    mean = sum(e.num_label_tokens for e in examples) / len(examples)
    assert first["label_tokens"] > 1.5 * 8 * mean, "a step's 8 rows hold about two examples each"


def logged_numbers(out: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of metrics.jsonl (what every tracker must have received)."""
    series: dict[str, dict[int, float]] = {}
    for entry in read_metrics(out / "metrics.jsonl"):
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, {})[entry["step"]] = value
    return series


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_tracker_section_without_its_package_is_one_error(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # NOTE: as if not installed, whether it is or not
    result = CliRunner().invoke(app, ["finetune", f"--{package}.enable=true" if package == "wandb" else "--mlflow.run_name=x",
                                      f"--output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.exit_code == 2
    assert f"needs the {package} package, which is not installed: pip install 'ernie45[{package}]'" in result.output
    assert not (tmp_path / "run").exists(), "refused before anything was built"


def test_mlflow_logs_what_metrics_jsonl_holds_to_a_local_store(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tracked_run(tmp_path, "--mlflow.experiment_name=ernie45-test", "--mlflow.tags={task: hellaswag}", "--checkpoint.enabled=false")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ernie45-test").experiment_id])
    assert run.info.run_name == "run" and run.data.tags["task"] == "hellaswag"
    expected = logged_numbers(out)
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(expected)
    for key, by_step in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} == pytest.approx(by_step), key


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from an offline run's .wandb file: wandb's log format (a ":W&B" header,
    then 32 KiB blocks of records: crc u32, length u16, type u8 (1 whole, 2-4 first/middle/last
    piece), payload) holding ``Record`` protobufs. NOTE: wandb 0.2x+ has no Python reader of its own."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, piece, history = run_file.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # NOTE: a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece, pos = piece + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
                history[row.pop("_step")] = row
    return history


def test_wandb_offline_writes_the_run_dir_with_the_metrics(tmp_path):
    pytest.importorskip("wandb")
    out = tracked_run(tmp_path, "--wandb.mode=offline", "--wandb.project=ernie45-test", "--checkpoint.enabled=false")
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    expected = logged_numbers(out)
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(expected)
    for key, by_step in expected.items():
        assert {step: history[step][key] for step in by_step} == pytest.approx(by_step), key
