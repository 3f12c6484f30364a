"""``ernie45 finetune`` end to end: the embedded default, the CPU twins of the HellaSwag examples
with tiny random HF checkpoints and real HellaSwag examples (tests/assets), exact resume, a kill while
checkpointing, bad configs, SFT data, and two gloo ranks (dp=2, tp=2, ep=2) against one process."""

from __future__ import annotations

import json
import math
import shlex
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import HELLASWAG, random_hf_model, tiny_dense_config, tiny_moe_config
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import Ernie4_5_MoeForCausalLM as HFMoeForCausalLM
from transformers import Ernie4_5ForCausalLM as HFForCausalLM
from typer.testing import CliRunner

import ernie45
from ernie45.cli import app
from ernie45.tokenizer import train_tokenizer
from ernie45.training.checkpointing import latest_checkpoint
from ernie45.jsonl import read_jsonl
from ernie45.training.data import record_texts
from ernie45.training.metrics import read_metrics
from ernie45.training.synthetic import ACTIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# NOTE: the twins hold out examples 5000-5007 of the full file for validation; the 300-example
# fixture holds out 200-207 (training reads the first 96 either way).
VALIDATION_OFFSET = 200


# ----- helpers ---------------------------------------------------------------------------------
def finetune(*args: str) -> dict:
    """Run ``ernie45 finetune ARGS`` in this process; returns summary.json."""
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    output_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--output_dir="))
    return json.loads((Path(output_dir) / "summary.json").read_text())


def finetune_process(*args: str, prelude: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``ernie45 finetune ARGS`` in a fresh Python process (after ``prelude`` code)."""
    script = f"{prelude}\nimport sys\nfrom ernie45.cli import main\nsys.argv = ['ernie45', 'finetune', *{list(args)!r}]\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def train_losses(output_dir: Path) -> list[float]:
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    return [e["loss"] for e in steps]


def twin(name: str, checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    """Arguments running a CPU twin example on ``checkpoint`` and the HellaSwag fixture."""
    return [
        str(EXAMPLES / name),
        f"--model.pretrained_model_name_or_path={checkpoint}",
        f"--dataset.path_or_dataset={HELLASWAG}",
        f"--validation_dataset.path_or_dataset={HELLASWAG}",
        f"--validation_dataset.sample_offset={VALIDATION_OFFSET}",
        f"--output_dir={output_dir}",
        *extra,
    ]


# ----- tiny random checkpoints with a tokenizer trained on HellaSwag text ------------------------
@pytest.fixture(scope="module")
def tokenizer():
    records = read_jsonl(HELLASWAG, limit=300)
    return train_tokenizer([t for r in records for t in record_texts(r)], vocab_size=400)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def _special_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer) -> Path:
    config = tiny_dense_config(**_special_ids(tokenizer), max_position_embeddings=512)
    return _save(random_hf_model(HFForCausalLM, config), tokenizer, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer) -> Path:
    config = tiny_moe_config(
        **_special_ids(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=512,
        moe_num_experts=4,
        moe_intermediate_size=32,
    )
    return _save(random_hf_model(HFMoeForCausalLM, config), tokenizer, tmp_path_factory.mktemp("moe"))


# ----- the embedded default --------------------------------------------------------------------
@pytest.mark.slow
def test_default_run_learns_and_exports_an_hf_model_transformers_loads(tmp_path):
    out = tmp_path / "run"
    summary = finetune(f"--output_dir={out}")  # the README's first command, with an output folder
    assert summary["val_loss_after"] < 0.2 * summary["val_loss_before"]
    assert summary["last_loss"] < 0.2 * summary["first_loss"]
    before, after = summary["multiple_choice_before"]["acc"], summary["multiple_choice_after"]["acc"]
    assert after > 0.6 and after > before + 0.3, (before, after)

    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = summary["steps"]
    step = next(e for e in entries if e.get("step") == last and "loss" in e)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "moe_max_over_mean_load", "aux_loss"):
        assert isinstance(step[key], float) and step[key] >= 0, key
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    val_every = resolved["step_scheduler"]["val_every_steps"]
    assert [e["step"] for e in entries if "val_loss" in e] == list(range(0, last + 1, val_every))
    for name in ("loss.png", "config.yaml", "summary.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    every, keep = resolved["step_scheduler"]["ckpt_every_steps"], resolved["checkpoint"]["keep_last_n"]
    kept = sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").iterdir())
    assert kept == list(range(last - every * (keep - 1), last + 1, every))

    hf_dir = out / "hf"
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ours = ernie45.from_pretrained(hf_dir).eval()
    ids = hf_tokenizer("Anna is in the kitchen. Anna picks up the knife, then Anna", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

    # the printed "try it" command continues a held-out context with what the task taught (the
    # object's action; the manner is a random filler the model cannot know)
    command = shlex.split(summary["try_it"])
    assert command[:2] == ["ernie45", "generate"] and command[command.index("--model") + 1] == str(hf_dir)
    prompt = command[command.index("--prompt") + 1]
    result = CliRunner().invoke(app, command[1:])
    assert result.exit_code == 0, result.output
    picked = next(obj for obj in ACTIONS if f"picks up the {obj}," in prompt)
    assert ACTIONS[picked] in result.output, (prompt, result.output)


# ----- exact resume, and a kill while writing a checkpoint -------------------------------------
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, dense_dir) -> list[float]:
    """8 uninterrupted steps of the 0.3B CPU twin (checkpoints at 4 and 8)."""
    out = tmp_path_factory.mktemp("straight")
    summary = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out))
    assert summary["steps"] == 8
    assert (out / "hf" / "model.safetensors").is_file()
    return train_losses(out)


def test_four_steps_then_resume_to_eight_reproduces_the_losses_exactly(tmp_path, dense_dir, straight_run):
    out = tmp_path / "run"
    # NOTE: the schedule is pinned to 8 steps so the first 4 steps are the straight run's first 4.
    first = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, "--step_scheduler.max_steps=4", "--lr_scheduler.lr_decay_steps=8"))
    assert first["steps"] == 4 and latest_checkpoint(out / "checkpoints").name == "step_4"
    resumed = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, "--lr_scheduler.lr_decay_steps=8", "--resume"))
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    assert train_losses(out) == straight_run
    again = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, "--lr_scheduler.lr_decay_steps=8", "--resume"))
    assert again["resumed_from_step"] == 8 and again["last_loss"] == straight_run[-1]  # nothing left to do
    assert train_losses(out) == straight_run and again["val_loss_before"] == resumed["val_loss_before"]


@pytest.mark.slow
def test_a_kill_while_checkpointing_leaves_the_previous_checkpoint_usable(tmp_path, dense_dir, straight_run):
    out = tmp_path / "run"
    # Kill the process (SIGKILL, no clean-up) right after the step-8 checkpoint's tensors are written,
    # before the checkpoint is complete.
    prelude = (
        "import os, signal\nimport torch.distributed.checkpoint as dcp\nreal_save, calls = dcp.save, []\n"
        "def save(*args, **kwargs):\n    real_save(*args, **kwargs)\n    calls.append(1)\n"
        "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "dcp.save = save\n"
    )
    killed = finetune_process(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out), prelude=prelude)
    assert killed.returncode == -9, killed.stderr[-3000:]
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert "step_4" in leftovers and "step_8" not in leftovers
    assert any(name.startswith(".step_8.tmp") for name in leftovers), leftovers
    assert latest_checkpoint(out / "checkpoints").name == "step_4"

    resumed = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, "--resume"))
    assert resumed["resumed_from_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_8"]
    assert train_losses(out) == straight_run


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--step_scheduler.global_batch_sze=4"], ["step_scheduler.global_batch_sze: unknown key", "global_batch_size"]),
        (["--step_scheduler.local_batch_size=5"], ["global_batch_size=16 must be a multiple of local_batch_size=5"]),
        (["--optimizer._target_=builtins.eval"], ["optimizer._target_", "not an allowed optimizer component"]),
        (["--model.torch_dtype=int8"], ["model.torch_dtype", "'bfloat16'"]),
        (["--distributed.ep_size=2"], ["distributed.ep_size=2 needs several ranks", "--nproc-per-node"]),
        (["--dataset._target_=ernie45.training.data.HellaSwag", "--dataset.path_or_dataset=/nowhere/x.jsonl",
          "--dataset.num_examples=null", "--dataset.seed=null"], ["/nowhere/x.jsonl does not exist"]),
        (["no_such_recipe.yaml"], ["recipe file no_such_recipe.yaml does not exist"]),
        ([str(EXAMPLES / "ernie4_5_0p3b_hellaswag_cpu.yaml")],
         ["model.pretrained_model_name_or_path='tiny-ernie4_5' is not a local directory", "HF_HOME="]),
        (["--step_scheduler.max_steps"], ["--section.key=value"]),
        ([str(EXAMPLES / "ernie4_5_0p3b_hellaswag_cpu.yaml"), "--nproc-per-node=2"],
         ["model.pretrained_model_name_or_path='tiny-ernie4_5' is not a local directory"]),  # before the ranks start
        (["--nproc-per-node=2", "--step_scheduler.local_batch_size=16"],
         ["global_batch_size=16 must be a multiple of local_batch_size=16 x 2 data-parallel ranks"]),
        (["--compile.mode=fast"], ["compile", "mode='fast' is not a torch.compile mode"]),
        (["--compile.enabled=true", "--distributed.tp_size=2"], ["compile.enabled with distributed.tp_size > 1"]),
        (["--compile.enabled=true", "--distributed.activation_checkpointing=true"],
         ["compile: activation checkpointing of a MoE model cannot run compiled blocks"]),
    ],
)
def test_bad_configs_are_reported_by_key_without_a_traceback(tmp_path, args, expected):
    result = CliRunner().invoke(app, ["finetune", *args, f"--output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output
    assert "Traceback" not in result.output


def test_output_dir_that_is_a_file_and_resume_without_output_dir_are_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["finetune", f"--output_dir={blocker}"])
    assert result.exit_code == 2
    assert f"output_dir {blocker} is a file, not a folder" in result.output
    # Without --output_dir a run gets a fresh runs/<timestamp>: --resume used to start over there silently.
    result = CliRunner().invoke(app, ["finetune", "--resume"])
    assert result.exit_code == 2
    assert "--resume continues an earlier run: pass its --output_dir" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl works here")
def test_nccl_without_a_gpu_is_refused_under_strict_before_the_ranks_start(tmp_path):
    # NOTE: without --strict it falls back to gloo with a notice (tests/test_automodel_recipes.py).
    result = CliRunner().invoke(app, ["finetune", "--dist_env.backend=nccl", "--nproc-per-node=2", "--strict", f"--output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "dist_env.backend='nccl' cannot run here (torch sees no CUDA GPU here); without --strict ernie45 uses 'gloo'" in result.output
    assert "Traceback" not in result.output


def test_help_documents_every_section():
    result = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for section in ("step_scheduler", "model", "backend", "distributed", "dataset", "validation_dataset",
                    "dataloader", "optimizer", "lr_scheduler", "loss_fn", "checkpoint", "rng", "moe",
                    "--nproc-per-node", "--resume", "--output_dir", "global_batch_size", "ep_size"):
        assert section in result.output, section


# ----- two gloo ranks follow one process -------------------------------------------------------
# NOTE: aot_eager runs the compiler's graphs on eager kernels: the same bits as the eager run, and
# seconds instead of inductor's minutes to build; tests/test_compile.py checks inductor's values.
# A two-rank run costs ~10 s (mostly start-up) and a compile ~10 s more (cp2: 9.3 -> 20.4 s), so
# compiled blocks ride along in the cp2 run and in the first half of the pp2 and ep2 resume runs below.
COMPILED = ("--compile.enabled=true", "--compile.backend=aot_eager")


@pytest.mark.parametrize(
    "layout",
    [["--distributed.tp_size=2", "--step_scheduler.local_batch_size=8",
      "--loss_fn._target_=ernie45.training.loss.MaskedCrossEntropy", "--loss_fn.chunk_size=null"],
     ["--distributed.cp_size=2", "--step_scheduler.local_batch_size=8", *COMPILED],
     ["--distributed.pp_size=2", "--step_scheduler.local_batch_size=8"]],
    ids=["tp2", "cp2-compiled", "pp2"],
)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_under_external_torchrun_follow_the_single_process_curve(tmp_path, dense_dir, straight_run, layout):
    """Tensor parallelism (tp=2), context parallelism (cp=2: each sequence split over the ranks; with
    compiled blocks) or pipeline parallelism (pp=2: one layer per stage, 1F1B, the fused loss on the
    last stage), started by an outside torchrun. (FSDP2 over 2 ranks with the fused loss follows one
    process in the packed-rows test below, started by --nproc-per-node.)"""
    out = tmp_path / "run"
    args = twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, *layout)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ernie45.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*torchrun, "finetune", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_8"]
    assert (out / "hf" / "model.safetensors").is_file()
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(straight_run), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_pipeline_run_resumes_in_one_process(tmp_path, dense_dir, straight_run):
    """pp=2 (one layer per stage on 2 gloo ranks, compiled blocks) for 4 steps, then --resume to 8 in
    one eager process: the DCP checkpoint the two stages wrote is read by another layout, and the
    losses are the straight run's."""
    out = tmp_path / "run"
    args = twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, "--lr_scheduler.lr_decay_steps=8")
    pipeline = ("--nproc-per-node=2", "--distributed.pp_size=2", "--step_scheduler.local_batch_size=8", *COMPILED)
    first = finetune_process(*args, *pipeline, "--step_scheduler.max_steps=4")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = finetune(*args, "--resume")
    assert resumed["resumed_from_step"] == 4 and resumed["world_size"] == 1
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(straight_run), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_process_moe(tmp_path_factory, moe_dir) -> list[float]:
    out = tmp_path_factory.mktemp("moe1")
    finetune(*twin("ernie4_5_21b_a3b_hellaswag_cpu.yaml", moe_dir, out, "--checkpoint.enabled=false"))
    return train_losses(out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_expert_parallel_over_two_ranks_follows_the_single_process_curve_across_a_resume(tmp_path, moe_dir, single_process_moe):
    """ep=2 (experts split over 2 gloo ranks, FSDP2 for the rest) via --nproc-per-node; 4 steps with
    compiled blocks, then --resume to 8 eagerly."""
    out = tmp_path / "run"
    args = twin("ernie4_5_21b_a3b_hellaswag_cpu.yaml", moe_dir, out, "--nproc-per-node=2", "--distributed.ep_size=2")
    first = finetune_process(*args, *COMPILED, "--step_scheduler.max_steps=4")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = finetune_process(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from_step"] == 4
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(single_process_moe), rtol=1e-5, atol=1e-6)


# ----- torch.compile ---------------------------------------------------------------------------
def test_compiled_blocks_follow_the_eager_curve(tmp_path, dense_dir, straight_run):
    """AutoModel's compile section: the 0.3B twin (bf16 autocast) trains with compiled blocks and
    evaluates eagerly; the losses are the straight run's, bit for bit."""
    out = tmp_path / "run"
    summary = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, *COMPILED))
    assert summary["steps"] == 8
    assert train_losses(out) == straight_run


@pytest.mark.slow
def test_compiled_blocks_with_lora_follow_the_eager_lora_run(tmp_path, dense_dir):
    lora = ("--peft.target_modules=['*_proj']", "--checkpoint.enabled=false")
    finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, tmp_path / "eager", *lora))
    finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, tmp_path / "compiled", *lora, *COMPILED))
    assert train_losses(tmp_path / "compiled") == train_losses(tmp_path / "eager")


def test_bf16_compute_keeps_fp32_master_state_and_the_bias_update_is_opt_in(tmp_path):
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader

    args = ["--step_scheduler.max_steps=3", "--step_scheduler.ckpt_every_steps=3", "--evaluation.multiple_choice=false",
            "--model.torch_dtype=bfloat16"]
    biases = {}
    for rate in (0.0, 0.05):
        out = tmp_path / f"rate{rate}"
        summary = finetune(f"--output_dir={out}", *args, f"--moe.bias_update_rate={rate}")
        assert math.isfinite(summary["last_loss"])
        saved = FileSystemReader(str(out / "checkpoints" / "step_3")).read_metadata().state_dict_metadata
        dtypes = {meta.properties.dtype for key, meta in saved.items() if hasattr(meta, "properties")}
        assert dtypes == {torch.float32}, dtypes  # master weights and Adam moments
        with safe_open(str(out / "hf" / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
            biases[rate] = f.get_tensor("model.layers.1.mlp.moe_statics.e_score_correction_bias")
    assert biases[0.0].dtype == torch.float32 and bool((biases[0.0] == 0).all())
    assert bool((biases[0.05] != 0).any()) and bool((biases[0.05].abs() <= 3 * 0.05 + 1e-6).all())


YARN = '{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 512}'


def test_model_config_overrides_the_checkpoints_config_for_context_extension(tmp_path, dense_dir):
    """With from_pretrained, ``model.config`` replaces config.json values (transformers' from_pretrained
    keywords): here YaRN to twice the trained length, kept in the exported model transformers loads."""
    out = tmp_path / "yarn"
    extend = [f"--model.config.rope_parameters={YARN}", "--model.config.max_position_embeddings=1024"]
    finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, *extend, "--step_scheduler.max_steps=2"))
    exported = json.loads((out / "hf" / "config.json").read_text())
    assert exported["max_position_embeddings"] == 1024 and exported["rope_parameters"] == json.loads(YARN)
    ours, hf = ernie45.from_pretrained(out / "hf"), AutoModelForCausalLM.from_pretrained(out / "hf")
    assert ours.model.rotary_emb.rope_type == hf.model.rotary_emb.rope_type == "yarn"
    ids = torch.randint(3, hf.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.config.model_type=ernie4_5_moe", "model.config.model_type='ernie4_5_moe', but"),
        ("--model.config.rope_scale=2.0", "model.config: ['rope_scale'] are not fields of the ernie4_5 config"),
        ("--model.config.num_attention_heads=3", "num_attention_heads=3 must be a multiple of num_key_value_heads=2"),
        ('--model.config.rope_parameters={"rope_type": "linear"}', "'rope_type'='linear': {'factor'}"),
        ("--model.config.dtype=float16", "model.config: ['dtype'] are set by the recipe's own keys"),
    ],
)
def test_bad_checkpoint_config_overrides_are_one_line_errors(tmp_path, dense_dir, override, expected):
    result = CliRunner().invoke(app, ["finetune", *twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, tmp_path / "run", override)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("rope", ['{"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}', '{"type": "dynamic", "factor": 2.0}'])
def test_context_parallel_with_a_length_dependent_rope_is_refused_before_the_ranks_start(tmp_path, dense_dir, rope):
    key = "rope_parameters" if "rope_type" in rope else "rope_scaling"  # transformers 4's name too
    args = twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, tmp_path / "run", f"--model.config.{key}={rope}",
                "--distributed.cp_size=2", "--step_scheduler.local_batch_size=8", "--nproc-per-node=2")  # fmt: skip
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exit_code == 2, result.output
    assert result.output.count("distributed.cp_size=2: rope_parameters.rope_type='dynamic' picks its frequencies") == 1


def test_sft_jsonl_with_prompt_completion_and_chat_records(tmp_path, dense_dir):
    records = [{"prompt": f"Q: what comes after {i}?", "completion": f" A: {i + 1}."} for i in range(6)]
    records += [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]} for i in range(6)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "max_steps": 3},
        "model": {"pretrained_model_name_or_path": str(dense_dir), "torch_dtype": "float32"},
        "dataset": {"_target_": "ernie45.training.data.SFTDataset", "path_or_dataset": "sft.jsonl"},
        "validation_dataset": {"_target_": "ernie45.training.data.SFTDataset", "path_or_dataset": "sft.jsonl"},
        "optimizer": {"lr": 1.0e-3},
        "dist_env": {"cpu_threads": 1},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    summary = finetune(str(tmp_path / "sft.yaml"), f"--output_dir={tmp_path / 'run'}")
    assert summary["steps"] == 3 and summary["multiple_choice_after"] is None  # not a multiple-choice set
    assert summary["val_loss_after"] < summary["val_loss_before"]


# ----- packed rows -------------------------------------------------------------------------------
PACKED = "--packed_sequence.packed_sequence_size=256"


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, dense_dir) -> Path:
    out = tmp_path_factory.mktemp("packed")
    finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, PACKED))
    return out


def test_packed_rows_train_with_less_padding_and_resume_exactly(tmp_path, dense_dir, straight_run, packed_run):
    packed = [e for e in read_metrics(packed_run / "metrics.jsonl") if "padding_fraction" in e]
    assert max(e["padding_fraction"] for e in packed) < 0.1  # rows of 256 tokens, examples of ~60-100
    assert json.loads((packed_run / "summary.json").read_text())["padding_fraction"] < 0.1
    assert train_losses(packed_run)[-1] < train_losses(packed_run)[0]
    out = tmp_path / "run"
    first = finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, PACKED, "--step_scheduler.max_steps=4", "--lr_scheduler.lr_decay_steps=8"))
    assert first["steps"] == 4
    finetune(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, PACKED, "--lr_scheduler.lr_decay_steps=8", "--resume"))
    assert train_losses(out) == train_losses(packed_run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_packed_rows_on_two_ranks_follow_one_process(tmp_path, dense_dir, packed_run):
    out = tmp_path / "run"
    run = finetune_process(*twin("ernie4_5_0p3b_hellaswag_cpu.yaml", dense_dir, out, PACKED, "--nproc-per-node=2"))
    assert run.returncode == 0, run.stderr[-4000:]
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(packed_run)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_packed_moe_rows_under_expert_parallelism_follow_one_process(tmp_path, moe_dir):
    single, parallel = tmp_path / "one", tmp_path / "ep2"
    finetune(*twin("ernie4_5_21b_a3b_hellaswag_cpu.yaml", moe_dir, single, PACKED, "--checkpoint.enabled=false"))
    args = twin("ernie4_5_21b_a3b_hellaswag_cpu.yaml", moe_dir, parallel, PACKED, "--checkpoint.enabled=false")
    run = finetune_process(*args, "--nproc-per-node=2", "--distributed.ep_size=2")
    assert run.returncode == 0, run.stderr[-4000:]
    torch.testing.assert_close(torch.tensor(train_losses(parallel)), torch.tensor(train_losses(single)), rtol=1e-5, atol=1e-6)
