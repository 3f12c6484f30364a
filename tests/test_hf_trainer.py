"""transformers' Trainer and TRL's SFTTrainer and DPOTrainer drive our models as they drive transformers' own:
same batches (the signature lets the attention mask and labels through), gradient accumulation
over ``num_items_in_batch``, activation checkpointing switched on by the Trainer, TRL's fused LM
head over ``model.base_model``, and the same losses and weights after training (fp32)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import ernie45

from builders import load_tokenizer, random_hf_model, random_hf_moe, save_tiny_lm, tiny_dense_config, tiny_moe_config
from transformers import AutoModelForCausalLM
from transformers import Ernie4_5ForCausalLM as HFDense


class PaddedRows(Dataset):
    """12 rows of 3-12 tokens, right-padded to 12 (pads masked, labels -100 there)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        length = 3 + index % 10
        ids = torch.zeros(12, dtype=torch.long)
        ids[:length] = torch.randint(3, 160, (length,), generator=generator)
        mask = (torch.arange(12) < length).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(model, output_dir) -> list[float]:
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        activation_checkpointing=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=PaddedRows())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind", ["dense", "moe", "moe-balanced"])
def test_transformers_trainer_trains_ours_as_it_trains_transformers(tmp_path, kind):
    """moe-balanced: output_router_logits in the config, so each step's loss has the weighted
    load-balancing loss in it (transformers' rule), over the padded rows' real tokens."""
    if kind == "dense":
        hf = random_hf_model(HFDense, tiny_dense_config())
    else:
        balanced = dict(output_router_logits=True, router_aux_loss_coef=0.05) if kind == "moe-balanced" else {}
        hf = random_hf_moe(tiny_moe_config(**balanced))
    hf.save_pretrained(tmp_path / "start")
    ours = ernie45.from_pretrained(tmp_path / "start")
    expected = _train(hf.train(), tmp_path / "hf")
    got = _train(ours.train(), tmp_path / "ours")
    assert ours.is_activation_checkpointing  # the Trainer switched it on
    assert len(got) == len(expected) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    hf_weights = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, hf_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def _sft(model, tokenizer, output_dir) -> list[float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = Dataset.from_list([{"text": f"A man is sitting on a roof. He starts {i} times"} for i in range(16)])
    args = SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=texts, processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trl_sft_trainer_trains_ours_as_it_trains_transformers(tmp_path):
    save_tiny_lm(tmp_path / "start")
    tokenizer = load_tokenizer(tmp_path / "start")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "start")
    ours = ernie45.from_pretrained(tmp_path / "start")
    expected = _sft(hf, tokenizer, tmp_path / "hf")
    got = _sft(ours, tokenizer, tmp_path / "ours")
    assert len(got) == len(expected) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    hf_weights = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, hf_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def _dpo(model, reference, tokenizer, output_dir) -> list[float]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = Dataset.from_list([
        {"prompt": f"A man is sitting on a roof {i}.", "chosen": " He climbs down.", "rejected": " He flies away quickly."}
        for i in range(8)
    ])  # fmt: skip
    args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trl_dpo_trainer_trains_ours_as_it_trains_transformers(tmp_path):
    save_tiny_lm(tmp_path / "start")
    tokenizer = load_tokenizer(tmp_path / "start")
    start = tmp_path / "start"
    hf, ours = AutoModelForCausalLM.from_pretrained(start), ernie45.from_pretrained(start)
    expected = _dpo(hf, AutoModelForCausalLM.from_pretrained(start), tokenizer, tmp_path / "hf")
    got = _dpo(ours, ernie45.from_pretrained(start), tokenizer, tmp_path / "ours")
    assert len(got) == len(expected) == 2 and got[1] != got[0]  # the second loss is after one update
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    hf_weights = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, hf_weights[name], rtol=1e-4, atol=1e-5, msg=name)
