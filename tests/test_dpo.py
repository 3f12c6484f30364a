"""Preference training (``dpo:``): the losses against TRL's, sequence log-probs against transformers'
logits, one full DPO step against a hand-written one, the synthetic task, pair data, exact resume,
LoRA's reference, and two gloo ranks (FSDP2, expert parallelism) against one process."""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from builders import HELLASWAG, random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config, token_batch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers import Ernie4_5_MoeForCausalLM as HFMoe
from transformers import Ernie4_5ForCausalLM as HFDense
from typer.testing import CliRunner

import ernie45
from ernie45.cli import app
from ernie45.jsonl import read_jsonl
from ernie45.tokenizer import train_tokenizer
from ernie45.training.config import DatasetConfig, DPOConfig, load_recipe, parse_overrides
from ernie45.peft import has_adapters
from ernie45.training.data import IGNORE_INDEX, TokenizedExample, load_records, record_texts, tokenize_records
from ernie45.training.dpo import PreferenceTrainer
from ernie45.training.preference import PreferenceExample, PreferenceLoss, collate_pairs, model_logps, preference_loss
from ernie45.training.runtime import StopSignals, init_runtime
from test_finetune_cli import finetune, finetune_process, train_losses

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEFAULT = EXAMPLES / "dpo_default.yaml"
TWIN = EXAMPLES / "ernie4_5_21b_a3b_dpo_lora_cpu.yaml"


# ----- the losses against TRL's ------------------------------------------------------------------
def random_pairs(pairs: int = 6, length: int = 12, seed: int = 0):
    """Per-token log-probs [2B,S-1] (0 off the answers), completion masks [2B,S], reference log-probs."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(1, 5, (), generator=generator))
        mask[row, start : start + int(torch.randint(1, length - start, (), generator=generator))] = 1
    per_token = -torch.rand(2 * pairs, length - 1, generator=generator) * 3 * mask[:, 1:]
    reference = per_token.sum(1) + torch.randn(2 * pairs, generator=generator)
    return per_token, mask, reference


def trl_dpo(loss_type: str, beta: float, per_token, mask, reference) -> tuple[float, dict]:
    """TRL's DPOTrainer loss and metrics on these log-probs (its precomputed-reference path)."""
    from trl import DPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    identity = lambda tensor: tensor  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), ld_alpha=None, precompute_ref_logps=True, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    ref_c, ref_r = reference.chunk(2)
    inputs = {"input_ids": mask, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss), {key: values[0] for key, values in metrics["train"].items()}


def trl_cpo(loss_type: str, beta: float, label_smoothing: float, chosen, rejected, gamma: float = 0.0):
    """TRL's CPOTrainer.cpo_loss (sigmoid with label smoothing = cDPO; simpo) -> (losses, chosen, rejected rewards)."""
    from trl.experimental.cpo import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


def ours(settings: DPOConfig, per_token, mask, reference):
    logps, tokens = per_token.sum(1), mask.sum(1)
    return preference_loss(logps, reference, tokens, settings)


@pytest.mark.parametrize("loss_type, beta, reference_free", [("sigmoid", 0.1, False), ("ipo", 0.5, False), ("sigmoid", 0.3, True)])
def test_dpo_losses_rewards_and_margins_equal_trl(loss_type, beta, reference_free):
    per_token, mask, reference = random_pairs()
    settings = DPOConfig(beta=beta, loss_type=loss_type, reference_free=reference_free)
    losses, chosen, rejected = ours(settings, per_token, mask, PreferenceLoss(settings).reference_logps({"reference_logps": reference}))
    # NOTE: TRL 1.16's DPO has no reference_free switch: a reference of zeros is the same loss.
    loss, metrics = trl_dpo(loss_type, beta, per_token, mask, torch.zeros_like(reference) if reference_free else reference)
    assert abs(float(losses.mean()) - loss) < 1e-6
    assert abs(float(chosen.mean()) - metrics["rewards/chosen"]) < 1e-6
    assert abs(float(rejected.mean()) - metrics["rewards/rejected"]) < 1e-6
    assert abs(float((chosen - rejected).mean()) - metrics["rewards/margins"]) < 1e-6
    assert float((chosen > rejected).float().mean()) == metrics["rewards/accuracies"]
    assert 0 < metrics["rewards/accuracies"] < 1  # both outcomes occur in the data


def test_label_smoothing_is_cdpo_as_in_trl_cpo():
    per_token, mask, reference = random_pairs(seed=1)
    losses, chosen, rejected = ours(DPOConfig(beta=0.2, label_smoothing=0.15), per_token, mask, reference)
    logratios = per_token.sum(1) - reference
    expected, expected_chosen, expected_rejected = trl_cpo("sigmoid", 0.2, 0.15, *logratios.chunk(2))
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close((chosen, rejected), (expected_chosen, expected_rejected), rtol=0, atol=1e-6)


def test_simpo_equals_trl_and_its_published_formula():
    per_token, mask, _ = random_pairs(seed=2)
    settings = DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.1)
    losses, chosen, rejected = ours(settings, per_token, mask, None)
    average = per_token.sum(1) / mask.sum(1)  # length-normalised log-probs
    expected, expected_chosen, expected_rejected = trl_cpo("simpo", 2.0, 0.1, *average.chunk(2), gamma=0.7)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close((chosen, rejected), (expected_chosen, expected_rejected), rtol=0, atol=1e-6)
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
    unsmoothed = ours(DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7), per_token, mask, None)[0]
    c, r = average.chunk(2)
    torch.testing.assert_close(unsmoothed, -F.logsigmoid(2.0 * c - 2.0 * r - 0.7), rtol=0, atol=1e-6)


# ----- sequence log-probs against transformers' logits -------------------------------------------
def transformers_logps(model, example: TokenizedExample) -> float:
    """Sum of log p(label) over the label tokens, from transformers' logits of the sequence alone."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logps = model(ids).logits[0].float().log_softmax(-1)
    return sum(float(logps[t, example.input_ids[t + 1]]) for t in range(len(ids[0]) - 1) if example.labels[t + 1] != IGNORE_INDEX)


def pair_examples(vocab: int, count: int = 3) -> list[PreferenceExample]:
    """Pairs of random ids of different lengths sharing a prompt; labels on the answers only."""
    examples = []
    for i in range(count):
        prompt = token_batch(vocab, 1, 3 + i, seed=10 + i)[0].tolist()
        answers = [token_batch(vocab, 1, n, seed=20 + 2 * i + k)[0].tolist() for k, n in enumerate((4 + 2 * i, 7 - i))]
        chosen, rejected = (TokenizedExample(prompt + a, [IGNORE_INDEX] * len(prompt) + a) for a in answers)
        examples.append(PreferenceExample(chosen, rejected))
    return examples


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_one_concatenated_forward_gives_each_sequences_log_prob(tmp_path, kind):
    hf = random_hf_model(HFDense, tiny_dense_config()) if kind == "dense" else random_hf_moe(tiny_moe_config())
    hf.save_pretrained(tmp_path)
    model = ernie45.from_pretrained(tmp_path)
    examples = pair_examples(hf.config.vocab_size)
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].shape[0] == 2 * len(examples) and batch["padding_mask"].any()  # padded rows
    with torch.no_grad():
        logps, tokens, _ = model_logps(model, batch)
    sequences = [e.chosen for e in examples] + [e.rejected for e in examples]
    expected = torch.tensor([transformers_logps(hf, s) for s in sequences])
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == [s.num_label_tokens for s in sequences]


def test_the_head_runs_on_label_positions_only(tmp_path):
    """Prompts and padding never reach the vocabulary head: its input is one row per label token."""
    hf = random_hf_model(HFDense, tiny_dense_config())
    hf.save_pretrained(tmp_path)
    model = ernie45.from_pretrained(tmp_path)
    batch = collate_pairs(pair_examples(hf.config.vocab_size), pad_id=0)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    with torch.no_grad():
        _, tokens, _ = model_logps(model, batch)
    assert rows == [(int(tokens.sum()), hf.config.hidden_size)]
    assert int(tokens.sum()) < batch["input_ids"].numel() // 2  # premise: most positions are prompt or padding


# ----- pair data ---------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"}]  # fmt: skip
RECORDS = [
    {"prompt": "Q: what is two plus two?", "chosen": " Four.", "rejected": " Five."},
    {"messages": CHAT, "chosen": "Green.", "rejected": "Blue again."},
    {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Green."}], "rejected": [{"role": "assistant", "content": "Red."}]},
    {"chosen": [*CHAT, {"role": "assistant", "content": "Green."}], "rejected": [*CHAT, {"role": "assistant", "content": "Red."}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t for r in RECORDS + hellaswag_pairs(60) for t in record_texts(r)], vocab_size=400)


def hellaswag_pairs(count: int) -> list[dict]:
    """HellaSwag contexts with the gold ending chosen over the next one."""
    return [{"prompt": r["ctx"], "chosen": " " + r["endings"][int(r["label"])], "rejected": " " + r["endings"][(int(r["label"]) + 1) % 4]}
            for r in read_jsonl(HELLASWAG, limit=count)]  # fmt: skip


def labelled(tokenizer, example: TokenizedExample) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_only_the_answers_carry_labels_in_text_chat_and_implicit_prompt_records(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = DatasetConfig(_target_="ernie45.training.preference.PreferenceDataset", path_or_dataset=str(path))
    pairs = tokenize_records(config, load_records(config), tokenizer)
    end = "<|end_of_sentence|>"
    expected = [(" Four.</s>", " Five.</s>"), ("Green." + end, "Blue again." + end), ("Green." + end, "Red." + end), ("Green." + end, "Red." + end)]
    assert [(labelled(tokenizer, p.chosen), labelled(tokenizer, p.rejected)) for p in pairs] == expected
    for pair in pairs:  # the prompt's tokens are the same in both sequences, and unlabelled
        prompt = pair.chosen.labels.index(next(label for label in pair.chosen.labels if label != IGNORE_INDEX))
        assert pair.chosen.input_ids[:prompt] == pair.rejected.input_ids[:prompt]
    rendered = tokenizer.apply_chat_template([*CHAT, {"role": "assistant", "content": "Green."}], tokenize=False)
    assert [tokenizer.decode(p.chosen.input_ids) for p in pairs[1:]] == [rendered] * 3  # "Blue." (an earlier turn) has no label


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Hi", "chosen": "Yes."}, "needs prompt (or messages) + chosen + rejected"),
        ({"prompt": "Hi", "chosen": "Yes.", "rejected": None}, "rejected must be a string like the prompt, got null"),
        ({"prompt": ["Hi"], "chosen": "Yes.", "rejected": "No."}, "prompt[0] must be an object with role and content"),
        ({"messages": CHAT, "chosen": [{"role": "assistant"}], "rejected": "No."}, "chosen[0].content must be a string, got null"),
        ({"chosen": "Yes.", "rejected": "No."}, "needs a prompt (or messages) when chosen and rejected are text"),
        ({"prompt": "Hi", "messages": CHAT, "chosen": "Yes.", "rejected": "No."}, "has both prompt and messages"),
    ],
)
def test_bad_records_are_named_by_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    config = DatasetConfig(_target_="ernie45.training.preference.PreferenceDataset", path_or_dataset=str(path))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2.*{re.escape(message)}"):
        load_records(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dpo": {"beta": 0.1}, "dataset": {"_target_": "ernie45.training.synthetic.SyntheticMultipleChoice"}}, "dpo: trains on preference pairs"),
        ({"dpo": None}, "holds preference pairs: add a dpo: section"),
        ({"dpo.simpo_gamma": 1.0}, "simpo_gamma is for loss_type simpo, not sigmoid"),
        ({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1}, "label_smoothing applies to the sigmoid and simpo losses"),
        ({"dpo.reference_free": True, "dpo.precompute_ref_log_probs": True}, "there is no reference model"),
        ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing: Input should be less than 0.5"),
        ({"dpo.loss_type": "kto"}, "dpo.loss_type: Input should be 'sigmoid', 'ipo' or 'simpo'"),
        ({"distributed.cp_size": 2}, "dpo: with distributed.cp_size > 1 is not supported"),
        ({"loss_fn._target_": "ernie45.training.loss.FusedLinearCrossEntropy"}, "dpo: computes its own loss from the logits"),
    ],
)
def test_bad_dpo_recipes_are_one_line_naming_the_key(overrides, message):
    if "dataset" in overrides:  # a whole section replaced
        overrides = {"dpo": overrides["dpo"], "dataset._target_": overrides["dataset"]["_target_"], "validation_dataset": None}
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(DEFAULT, overrides)


# ----- one full DPO step, by hand ----------------------------------------------------------------
def save_dense(path: Path, tokenizer) -> Path:
    config = tiny_dense_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    random_hf_model(HFDense, config).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def hand_sequence(tokenizer, prompt: str, answer: str) -> TokenizedExample:
    prompt_ids, answer_ids = tokenizer(prompt)["input_ids"], tokenizer(answer + tokenizer.eos_token)["input_ids"]
    return TokenizedExample(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def policy_logps(model, sequence: TokenizedExample) -> tuple[torch.Tensor, int]:
    """(sum of the answer's token log-probs, its tokens) from transformers' model on the sequence alone."""
    ids = torch.tensor([sequence.input_ids])
    logps = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    keep = torch.tensor(sequence.labels[1:]) != IGNORE_INDEX
    return logps[torch.arange(len(targets)), targets][keep].sum(), int(keep.sum())


def test_one_full_dpo_step_equals_a_hand_written_one(tmp_path, tokenizer):
    """Two micro-batches of 2 pairs; sigmoid with label smoothing and an SFT term; AdamW with eps=1 so
    that the update follows the gradient's scale (with a tiny eps, Adam's first step is its sign)."""
    model_dir = save_dense(tmp_path / "model", tokenizer)
    records = hellaswag_pairs(4)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    beta, smoothing, sft, lr = 0.5, 0.1, 0.5, 1e-2
    recipe = {
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "max_steps": 1},
        "model": {"pretrained_model_name_or_path": str(model_dir), "torch_dtype": "float32"},
        "dataset": {"_target_": "ernie45.training.preference.PreferenceDataset", "path_or_dataset": "pairs.jsonl"},
        "dataloader": {"shuffle": False},
        "dpo": {"beta": beta, "label_smoothing": smoothing, "sft_loss_ratio": sft},
        "optimizer": {"lr": lr, "eps": 1.0, "weight_decay": 0.0},
        "lr_scheduler": {"lr_decay_style": "constant"},
        "clip_grad_norm": {"max_norm": None},
        "checkpoint": {"enabled": False},
        "dist_env": {"cpu_threads": 1},
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    summary = finetune(str(tmp_path / "dpo.yaml"), f"--output_dir={tmp_path / 'run'}")

    policy = HFDense.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), eps=1.0, weight_decay=0.0)
    losses, margins = [], []
    for record in records:
        (c, n_c), (r, _) = (policy_logps(policy, hand_sequence(tokenizer, record["prompt"], record[k])) for k in ("chosen", "rejected"))
        with torch.no_grad():
            ref_c, ref_r = (policy_logps(reference, hand_sequence(tokenizer, record["prompt"], record[k]))[0] for k in ("chosen", "rejected"))
        d = (c - ref_c) - (r - ref_r)
        losses.append(-F.logsigmoid(beta * d) * (1 - smoothing) - F.logsigmoid(-beta * d) * smoothing + sft * -c / n_c)
        margins.append(float(beta * d.detach()))
    loss = torch.stack(losses).mean()
    loss.backward()
    optimizer.step()

    entry = next(e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if e.get("step") == 1)
    assert abs(entry["loss"] - float(loss.detach())) < 1e-6 and summary["first_loss"] == entry["loss"]
    assert abs(entry["rewards/margins"] - sum(margins) / 4) < 1e-6 and entry["rewards/margins"] == 0.0  # policy = reference
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss"} <= set(entry)
    saved = load_file(tmp_path / "run" / "hf" / "model.safetensors")
    expected = policy.state_dict()
    assert saved.keys() <= expected.keys() and len(saved) > 10
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    moved = max(float((expected[n] - t).abs().max()) for n, t in load_file(model_dir / "model.safetensors").items())
    assert moved > 1e-4  # the step changed the weights (so the comparison above means something)


# ----- the embedded synthetic task, resume, the precomputed reference ----------------------------
def metric(out: Path, key: str) -> list[float]:
    return [e[key] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in e]


@pytest.mark.slow
def test_the_synthetic_task_learns_to_prefer_the_chosen_answers(tmp_path):
    out = tmp_path / "run"
    summary = finetune(str(DEFAULT), f"--output_dir={out}", "--checkpoint.enabled=false")
    accuracy, margins = metric(out, "rewards/accuracies"), metric(out, "rewards/margins")
    assert accuracy[0] == 0.0 and margins[0] == 0.0  # the policy starts as its reference
    assert sum(accuracy[1:11]) / 10 < 0.7  # indifferent at first (chance: 0.5)
    assert sum(accuracy[-10:]) / 10 >= 0.9 and margins[-1] > 1.0
    assert summary["preference"]["accuracies_last"] >= 0.9 and summary["val_loss_after"] < 0.5 < summary["val_loss_before"]


def test_resume_is_exact_and_a_precomputed_reference_or_compiled_blocks_give_the_same_run(tmp_path):
    common = [str(DEFAULT), "--dataset.num_examples=200", "--step_scheduler.max_steps=6", "--step_scheduler.ckpt_every_steps=3", "--validation_dataset=null",
              "--lr_scheduler.lr_decay_steps=6", "--checkpoint.save_consolidated=false"]  # fmt: skip
    finetune(*common, f"--output_dir={tmp_path / 'straight'}")
    finetune(*common, f"--output_dir={tmp_path / 'resumed'}", "--step_scheduler.max_steps=3")
    resumed = finetune(*common, f"--output_dir={tmp_path / 'resumed'}", "--resume")
    assert resumed["resumed_from_step"] == 3
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metric(tmp_path / "resumed", key) == metric(tmp_path / "straight", key)
    finetune(*common, f"--output_dir={tmp_path / 'precomputed'}", "--dpo.precompute_ref_log_probs=true")
    for key in ("loss", "rewards/margins"):
        torch.testing.assert_close(torch.tensor(metric(tmp_path / "precomputed", key)), torch.tensor(metric(tmp_path / "straight", key)))
    # compile: the policy's blocks compiled (aot_eager: the compiler's graphs on eager kernels), the same bits
    finetune(*common, f"--output_dir={tmp_path / 'compiled'}", "--compile.enabled=true", "--compile.backend=aot_eager")
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert metric(tmp_path / "compiled", key) == metric(tmp_path / "straight", key)


# ----- LoRA's reference, and two gloo ranks against one process ----------------------------------
def save_checkpoint(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer) -> Path:
    config = tiny_moe_config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                             moe_num_experts=4, moe_intermediate_size=32, **SPECIAL_IDS)  # fmt: skip
    return save_checkpoint(random_hf_moe(config), tokenizer, tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer) -> Path:
    config = tiny_dense_config(vocab_size=len(tokenizer), **SPECIAL_IDS)
    return save_checkpoint(random_hf_model(HFDense, config), tokenizer, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hellaswag_pairs(48)))
    return path


def twin(checkpoint: Path, pairs: Path, output_dir: Path, *extra: str) -> list[str]:
    """Arguments running the LoRA-DPO CPU twin on ``checkpoint`` and the HellaSwag pairs."""
    data = [f"--{key}.path_or_dataset={pairs}" for key in ("dataset", "validation_dataset")]
    return [str(TWIN), f"--model.pretrained_model_name_or_path={checkpoint}", *data, f"--output_dir={output_dir}", *extra]


def test_with_lora_the_reference_is_the_base_model_exactly(tmp_path, moe_dir, pairs_file):
    """The reference of a LoRA-DPO run (the policy with its adapters switched off) computes the base
    model's log-probs, bit for bit, before and after the policy's adapters have trained."""
    args = twin(moe_dir, pairs_file, tmp_path / "run")
    config = load_recipe(args[0], parse_overrides(args[1:]))
    with StopSignals() as signals:
        trainer = PreferenceTrainer(config, init_runtime(config.dist_env), Path(config.output_dir), signals)
    reference = trainer.loss_fn.reference
    assert has_adapters(trainer.model) and reference.model is trainer.model  # the policy, adapters off: no second copy
    base = ernie45.from_pretrained(moe_dir, dtype=torch.float32)
    batch = trainer.batch(trainer.train_loader, [0, 1, 2])
    logps = torch.no_grad()(lambda model: model_logps(model, batch)[0])
    expected = logps(base)
    assert torch.equal(logps(reference), expected) and torch.equal(logps(trainer.model), expected)  # adapters start at B = 0
    trainer.train_step(0)
    trainer.train_step(1)
    assert torch.equal(logps(reference), expected)
    assert not torch.allclose(logps(trainer.model), expected)  # the policy's adapters trained


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind, layout", [("dense", ["--peft=null"]), ("moe", ["--distributed.ep_size=2"])], ids=["fsdp2-full", "ep2-lora"])
def test_two_ranks_follow_one_process(tmp_path, request, pairs_file, kind, layout):
    """Full DPO of the dense model under FSDP2 (dp=2), LoRA-DPO of the MoE with expert parallelism
    (ep=2): the reference model laid out like the policy, 5 steps, against one process."""
    checkpoint = request.getfixturevalue(f"{kind}_dir")
    single = tmp_path / "single"
    finetune(*twin(checkpoint, pairs_file, single, *[a for a in layout if a.startswith("--peft")], "--checkpoint.enabled=false"))
    ranks = tmp_path / "ranks"
    run = finetune_process(*twin(checkpoint, pairs_file, ranks, "--nproc-per-node=2", *layout))
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads((ranks / "summary.json").read_text())["world_size"] == 2
    assert len(train_losses(single)) == 5
    # NOTE: a reward is beta x a difference of two sequence log-probabilities of tens of nats, so fp32
    # sums in another order (sharded products, all-reduces) move it by ~1e-6 absolute: atol 1e-5.
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
        torch.testing.assert_close(torch.tensor(metric(ranks, key)), torch.tensor(metric(single, key)), rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert metric(single, "val_loss") and metric(ranks, "val_loss") == pytest.approx(metric(single, "val_loss"), rel=1e-5)
