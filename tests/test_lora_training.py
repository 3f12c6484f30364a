"""LoRA in the fine-tuning recipe (``peft:``): what trains, what is checkpointed and exported, and
that the adapter a run writes is the one HF PEFT loads onto transformers' model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM
from transformers import Ernie4_5_MoeForCausalLM as HFMoe
from typer.testing import CliRunner

import ernie45
from builders import HELLASWAG, random_hf_moe, tiny_moe_config, token_batch
from ernie45.cli import app
from ernie45.jsonl import read_jsonl
from ernie45.peft import PeftConfig
from ernie45.tokenizer import train_tokenizer
from ernie45.training.components import check_peft_model
from ernie45.training.config import ConfigError, load_recipe
from ernie45.training.data import record_texts
from test_finetune_cli import finetune, finetune_process, train_losses, twin

LORA_TWIN = "ernie4_5_21b_a3b_hellaswag_lora_cpu.yaml"
EVERYTHING = "--peft.target_modules=['*']"  # every linear layer and the routed experts


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def checkpointed_keys(path: Path) -> list[str]:
    return sorted(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """A tiny random MoE saved by transformers (routing that the correction bias changes) + a tokenizer."""
    tokenizer = train_tokenizer([t for r in read_jsonl(HELLASWAG, limit=300) for t in record_texts(r)], vocab_size=400)
    config = tiny_moe_config(
        vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, head_dim=16, max_position_embeddings=512, moe_num_experts=4, moe_intermediate_size=32,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("moe")
    random_hf_moe(config, bias_std=0.5).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, moe_dir) -> Path:
    """8 uninterrupted steps of the LoRA CPU twin on one process (checkpoints at 4 and 8)."""
    out = tmp_path_factory.mktemp("straight")
    finetune(*twin(LORA_TWIN, moe_dir, out))
    return out


def test_the_default_task_learns_with_lora_and_reports_what_trains(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", f"--output_dir={out}", EVERYTHING, "--step_scheduler.max_steps=100"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < 0.85 * summary["first_loss"]
    before, after = summary["multiple_choice_before"]["acc"], summary["multiple_choice_after"]["acc"]
    assert after > before + 0.2, (before, after)
    adapters = adapter_tensors(out)
    trainable = sum(t.numel() for t in adapters.values())
    assert f"(LoRA: {trainable:,} trainable, " in result.output
    # the checkpoint: adapters (in our layout) and their optimizer state, nothing of the frozen base
    keys = checkpointed_keys(out / "checkpoints" / "step_100")
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == len(adapters) and all("lora_" in k for k in model_keys)
    assert {k.split(".")[2] for k in keys if k.startswith("optim.state.")} == {"model"}
    assert len({k.rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}) == len(adapters)
    assert (out / "hf" / "model.safetensors").is_file()  # the merged model


def test_the_adapter_a_run_writes_is_what_peft_loads_and_hf_is_it_merged(straight, moe_dir):
    config = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(moe_dir) and config["r"] == 8 and config["lora_alpha"] == 16
    assert any(t.endswith("mlp.experts.gate_up_proj") for t in config["target_parameters"])
    ids = token_batch(400, 2, 12)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(HFMoe.from_pretrained(moe_dir), straight / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(straight / "hf", dtype=torch.float32).eval()(ids).logits
        ours = ernie45.from_pretrained(moe_dir, adapter=straight / "adapter")(ids).logits
        base = HFMoe.from_pretrained(moe_dir).eval()(ids).logits
    assert (peft_logits - base).abs().max() > 1e-2  # the adapter trained
    torch.testing.assert_close(merged, peft_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, peft_logits, atol=1e-5, rtol=1e-5)


def test_four_lora_steps_then_resume_reproduce_the_straight_run_exactly(tmp_path, moe_dir, straight):
    out = tmp_path / "run"
    finetune(*twin(LORA_TWIN, moe_dir, out, "--step_scheduler.max_steps=4"))
    resumed = finetune(*twin(LORA_TWIN, moe_dir, out, "--resume"))
    assert resumed["resumed_from_step"] == 4
    assert train_losses(out) == train_losses(straight)
    for key, tensor in adapter_tensors(straight).items():
        assert torch.equal(adapter_tensors(out)[key], tensor), key


@pytest.mark.parametrize(
    "layout", [["--distributed.ep_size=2"], ["--distributed.activation_checkpointing=true"]], ids=["ep2", "fsdp2-ac"]
)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_write_the_adapter_one_process_writes(tmp_path, moe_dir, layout):
    """ep=2 (expert adapters split with their experts) or FSDP2 over 2 gloo ranks: after 3 steps the
    same adapter as one process.

    NOTE: at lr 1e-3, not the twin's 1e-2: Adam divides each gradient by its own root mean square,
    so where a gradient is near eps (lora_A's are small at first) the last-bit differences of
    another summation order grow with the lr: 2e-6 at lr 1e-2 (one value of 0.047), 10x less here."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--step_scheduler.max_steps=3", "--checkpoint.enabled=false", "--optimizer.lr=1e-3")
    finetune(*twin(LORA_TWIN, moe_dir, one, *common))
    run = finetune_process(*twin(LORA_TWIN, moe_dir, two, "--nproc-per-node=2", *common, *layout))
    assert run.returncode == 0, run.stderr[-4000:]
    torch.testing.assert_close(torch.tensor(train_losses(two)), torch.tensor(train_losses(one)), rtol=1e-5, atol=1e-6)
    reference = adapter_tensors(one)
    assert sorted(adapter_tensors(two)) == sorted(reference)
    for key, tensor in adapter_tensors(two).items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-6, rtol=0, msg=key)
    merged = load_file(one / "hf" / "model.safetensors")  # folded on each rank's shards, then gathered
    for key, tensor in load_file(two / "hf" / "model.safetensors").items():
        torch.testing.assert_close(tensor, merged[key], atol=1e-6, rtol=0, msg=key)


def test_bf16_compute_keeps_the_base_in_bf16_and_trains_float32_adapters(tmp_path):
    out = tmp_path / "run"
    args = [f"--output_dir={out}", EVERYTHING, "--model.torch_dtype=bfloat16", "--step_scheduler.max_steps=3",
            "--evaluation.multiple_choice=false"]  # fmt: skip
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in adapter_tensors(out).values()} == {torch.float32}
    saved = FileSystemReader(str(out / "checkpoints" / "step_3")).read_metadata().state_dict_metadata
    assert {meta.properties.dtype for meta in saved.values() if hasattr(meta, "properties")} == {torch.float32}
    merged = load_file(out / "hf" / "model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert merged["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays fp32


def test_the_fused_loss_refuses_an_adapted_lm_head():
    config = load_recipe(None, {"loss_fn._target_": "ernie45.training.loss.FusedLinearCrossEntropy", "peft.dim": 4})
    model = ernie45.from_config(tiny_moe_config(tie_word_embeddings=False), peft=PeftConfig(target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="FusedLinearCrossEntropy reads the LM head's weight directly"):
        check_peft_model(config, model)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--peft.use_dora=true"], "peft.use_dora: DoRA is not supported by ernie45"),
        (["--peft.bogus=1"], "peft.bogus: unknown key"),
        (["--moe.bias_update_rate=0.01"], "moe.bias_update_rate must be 0 with peft"),
        (["--peft.target_modules=['*.nothing']"], "matched no linear layer or routed experts"),
    ],
)
def test_lora_settings_that_cannot_run_are_refused_in_one_line(tmp_path, args, expected):
    result = CliRunner().invoke(app, ["finetune", f"--output_dir={tmp_path / 'run'}", EVERYTHING, *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_save_consolidated_every_writes_the_adapter_mid_run_and_keeps_training_it(tmp_path, moe_dir, straight):
    """Mid-run exports of a LoRA run are the adapter (merging would end the training); the losses are the straight run's."""
    out = tmp_path / "run"
    finetune(*twin(LORA_TWIN, moe_dir, out, "--checkpoint.save_consolidated=every"))
    assert train_losses(out) == train_losses(straight)
    assert (out / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "hf" / "config.json").is_file()
