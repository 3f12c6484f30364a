"""Preference training (DPO and its variants): pair data, sequence log-probs, the losses.

Data: one record per preference, ``{"prompt", "chosen", "rejected"}`` as text, or as chats: the
prompt as ``prompt`` or ``messages`` (a list of {role, content}), each answer as text (one
assistant reply) or a list of messages; TRL's "implicit prompt" records (only ``chosen`` and
``rejected``, both whole chats) take their common leading messages as the prompt. Chats are
rendered with the tokenizer's chat template. Only the answer's tokens carry labels (the prompt,
earlier assistant turns included, is masked), so both sequences of a pair share the prompt tokens.

One forward per micro-batch: its B chosen and B rejected sequences go through the model as one
batch of 2B rows (chosen first). A sequence's log-prob is the sum of ``log p(token)`` over its
label tokens (``sequence_logps``). With ``pi`` the policy's, ``ref`` the reference model's
(0 when ``reference_free``), ``n`` the label tokens, ``c``/``r`` chosen/rejected, and the loss
names of TRL and ERNIEKit (``loss_type``):

  sigmoid  d = (pi_c - ref_c) - (pi_r - ref_r)
           loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)   (eps: label_smoothing, cDPO)
  ipo      d = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r,  loss = (d - 1 / (2 beta))^2
  simpo    d = pi_c / n_c - pi_r / n_r - gamma / beta    (no reference model)
           loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)

Rewards (logged, TRL's definitions): ``beta (pi - ref)`` for sigmoid and ipo, ``beta pi / n`` for
simpo. ``sft_loss_ratio`` adds that many times the chosen answer's mean token NLL ``-pi_c / n_c``
to each pair's loss (ERNIEKit's name; NOTE: a per-pair mean, where ERNIEKit and TRL's ``rpo_alpha``
average over all chosen tokens of a batch: the same when the answers are equally long). A step's
loss is the mean over its pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..jsonl import json_type
from ..models.loss import IGNORE_INDEX, check_labels
from .data import (
    FileDataset,
    RecordDataset,
    TokenizedExample,
    chat_segments,
    check_messages,
    collate,
    sft_segments,
)
from .loss import FusedLinearCrossEntropy, _forward
from .synthetic import make_examples

if TYPE_CHECKING:  # NOTE: config.py imports this module (through the registry); only the types are needed here
    from .config import DPOConfig, RecipeConfig

LOSS_TYPES = ("sigmoid", "ipo", "simpo")
LENGTH_NORMALISED = ("ipo", "simpo")  # losses on per-token log-ratios (TRL and ERNIEKit alike)
DEFAULT_SIMPO_GAMMA = 0.5  # TRL's and ERNIEKit's default


# ----- records ---------------------------------------------------------------------------------
def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def check_preference_record(record: dict, where: str) -> None:
    """A prompt (text or messages, or ``messages``) + chosen + rejected, or TRL's implicit-prompt pair of chats."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where} needs prompt (or messages) + chosen + rejected; it has {sorted(record)}")
    if "prompt" in record and "messages" in record:
        raise ValueError(f"{where} has both prompt and messages: give the prompt once")
    prompt = record.get("prompt", record.get("messages"))
    prompt_key = "prompt" if "prompt" in record else "messages"
    if prompt is None and not all(isinstance(record[key], list) for key in ("chosen", "rejected")):
        raise ValueError(f"{where} needs a prompt (or messages) when chosen and rejected are text")
    if _is_text(prompt):
        for key in ("chosen", "rejected"):
            if not _is_text(record[key]):
                raise ValueError(f"{where}: {key} must be a string like the prompt, got {json_type(record[key])}")
        return
    if prompt is not None:
        check_messages(prompt, where, prompt_key)
    for key in ("chosen", "rejected"):
        if not _is_text(record[key]):
            check_messages(record[key], where, key)


def _as_messages(answer: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer


def split_chat(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a chat record; an implicit prompt is the pair's common leading messages."""
    chosen, rejected = _as_messages(record["chosen"]), _as_messages(record["rejected"])
    prompt = record.get("prompt", record.get("messages"))
    if prompt is not None:
        return prompt, chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1  # NOTE: each answer keeps at least its last message
    return chosen[:shared], chosen[shared:], rejected[shared:]


def answer_only(segments: list[tuple[str, bool]], prompt_chars: int) -> list[tuple[str, bool]]:
    """``segments`` with the labels of the first ``prompt_chars`` characters (the prompt's turns) removed."""
    kept, done = [], 0
    for text, trained in segments:
        kept.append((text, trained and done >= prompt_chars))
        done += len(text)
    return kept


def answer_segments(tokenizer, record: dict, answer: str, where: str) -> list[tuple[str, bool]]:
    """The prompt followed by ``record[answer]`` (``chosen`` or ``rejected``); only the answer trained."""
    prompt = record.get("prompt", record.get("messages"))
    if _is_text(prompt):
        return sft_segments(tokenizer, {"prompt": prompt, "completion": record[answer]}, where)
    messages, chosen, rejected = split_chat(record)
    segments = chat_segments(tokenizer, messages + (chosen if answer == "chosen" else rejected), where)
    # NOTE: chat_segments cuts at every message boundary, so the prompt's rendering ends on one.
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
    return answer_only(segments, len(prompt_text))


# ----- tokenised pairs -------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceExample:
    """A tokenised pair; ``reference_logps`` (chosen, rejected) once precomputed."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    reference_logps: tuple[float, float] | None = None

    @property
    def num_label_tokens(self) -> int:
        return self.chosen.num_label_tokens + self.rejected.num_label_tokens


def collate_pairs(examples: list[PreferenceExample], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """B pairs as one batch of 2B rows, the chosen sequences first (``collate``'s keys), plus
    ``reference_logps`` [2B] when every pair has them precomputed."""
    batch = collate([ex.chosen for ex in examples] + [ex.rejected for ex in examples], pad_id, pad_to_multiple_of)
    if all(ex.reference_logps is not None for ex in examples):
        pairs = torch.tensor([ex.reference_logps for ex in examples], dtype=torch.float32)  # [B,2]
        batch["reference_logps"] = pairs.T.reshape(-1)  # chosen..., rejected...
    return batch


@dataclass(frozen=True, kw_only=True)
class PairDataset(RecordDataset):
    """Preference records, tokenised into ``PreferenceExample`` pairs (``tokenize``)."""

    def segments(self, tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
        """The prompt and the chosen answer: the pair's SFT view (what ``sft_loss_ratio`` trains)."""
        return answer_segments(tokenizer, record, "chosen", where)

    def tokenize(self, records: list[dict], tokenizer) -> list[PreferenceExample]:
        """Both sequences of every pair, cut to ``seq_length``; a pair with an answer left without
        label tokens is dropped."""
        pairs = []
        for i, record in enumerate(records):
            where = f"{self.name} record {i}"
            chat = not _is_text(record.get("prompt", record.get("messages")))
            chosen = self.encode(tokenizer, self.segments(tokenizer, record, where), chat)
            rejected = self.encode(tokenizer, answer_segments(tokenizer, record, "rejected", where), chat)
            if chosen.num_label_tokens and rejected.num_label_tokens:
                pairs.append(PreferenceExample(chosen, rejected))
        if not pairs:
            raise ValueError(f"dataset {self.name}: no pair has label tokens left in both answers (seq_length={self.seq_length})")
        return pairs


@dataclass(frozen=True, kw_only=True)
class PreferenceDataset(FileDataset, PairDataset):
    """JSONL preference records (or a hub dataset's ``split``): prompt or messages + chosen + rejected."""

    def check(self, record: dict, where: str) -> None:
        check_preference_record(record, where)


def preference_record(example: dict) -> dict:
    """A synthetic multiple-choice example as a pair: the gold ending chosen over the first other one."""
    wrong = next(i for i in range(len(example["endings"])) if i != example["label"])
    return {"prompt": example["ctx"], "chosen": " " + example["endings"][example["label"]], "rejected": " " + example["endings"][wrong]}


@dataclass(frozen=True, kw_only=True)
class SyntheticPreference(PairDataset):
    """The seeded task of ``synthetic.py`` as preference pairs: after "... picks up the knife, then
    Anna", " slowly cuts the bread." is chosen over " slowly sweeps the dusty floor.". A model that
    starts indifferent must learn the object -> verb rule to prefer the chosen answers."""

    num_examples: int
    seed: int

    @property
    def name(self) -> str:
        return f"synthetic preference (seed {self.seed})"

    def read(self, limit: int | None) -> list[dict]:
        return [preference_record(example) for example in make_examples(self.num_examples, self.seed)[:limit]]


# ----- log-probs and losses --------------------------------------------------------------------
def label_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the positions whose next token is a label [B,S] bool, those labels [N]): only these
    positions' logits are used, so only they go through the head. (No context parallelism here:
    preference losses need whole sequences.)"""
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)  # position t -> t+1
    keep = targets != IGNORE_INDEX
    return keep, targets[keep]


def sequence_logps(logits: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``log p(label)`` over each row's label tokens [B] fp32, their number [B]) from the
    label positions' logits [N,V], ``keep`` [B,S] and the labels [N] (``label_positions``)."""
    check_labels(targets, logits.shape[-1])
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # NOTE: [N,V] fp32, labels only
    per_token = torch.zeros(keep.shape, dtype=torch.float32, device=logits.device).masked_scatter(keep, token_logps)
    return per_token.sum(-1), keep.sum(-1)


def model_logps(model: nn.Module, batch: dict[str, torch.Tensor]):
    """(sequence log-probs [N], label tokens [N], the model's output) of one forward over ``batch``;
    the head runs on the label positions only (a boolean ``logits_to_keep``), not on the prompts."""
    keep, targets = label_positions(batch)
    output = _forward(model, batch, logits_to_keep=keep)
    logps, tokens = sequence_logps(output.logits, keep, targets)
    return logps, tokens, output


def simpo_gamma(settings: DPOConfig) -> float:
    return DEFAULT_SIMPO_GAMMA if settings.simpo_gamma is None else settings.simpo_gamma


def _smoothed_sigmoid_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing


def preference_loss(
    logps: torch.Tensor, reference_logps: torch.Tensor | None, tokens: torch.Tensor, settings: DPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss [B], chosen reward [B], rejected reward [B]) from the 2B sequence log-probs of
    policy and reference (None: reference-free) and their label tokens, chosen rows first."""
    beta, loss_type = settings.beta, settings.loss_type
    pi_c, pi_r = logps.chunk(2)
    n_c, n_r = tokens.to(logps.dtype).chunk(2)
    if loss_type == "simpo":
        chosen, rejected = pi_c / n_c, pi_r / n_r
        margin = chosen - rejected - simpo_gamma(settings) / beta
        return _smoothed_sigmoid_loss(margin, beta, settings.label_smoothing), beta * chosen.detach(), beta * rejected.detach()
    ref_c, ref_r = reference_logps.chunk(2) if reference_logps is not None else (0.0, 0.0)
    chosen, rejected = pi_c - ref_c, pi_r - ref_r  # log-ratios
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(chosen - rejected, beta, settings.label_smoothing)
    elif loss_type == "ipo":
        losses = (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}; choose one of {list(LOSS_TYPES)}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ----- the loss the recipe calls ---------------------------------------------------------------
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss")


@dataclass
class PreferenceOutput:
    """What a preference loss hands the training loop besides the loss: the policy's MoE ``aux_loss``
    and the micro-batch's ``metric_sums`` (over its pairs, in ``METRICS`` order)."""

    aux_loss: torch.Tensor | None
    metric_sums: torch.Tensor


class PreferenceLoss:
    """The preference loss of a micro-batch of pairs (``collate_pairs``), summed over its pairs.

    ``reference``: the frozen reference model, run on the same batch when the batch brings no
    precomputed ``reference_logps`` (None: reference-free, or every log-prob precomputed).
    """

    def __init__(self, settings: DPOConfig, reference: nn.Module | None = None):
        self.settings = settings
        self.reference = reference

    def uses_reference(self) -> bool:
        return not (self.settings.reference_free or self.settings.loss_type == "simpo")

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.uses_reference():
            return None
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.reference is None:
            raise ValueError("this preference loss needs a reference model or precomputed reference_logps")
        with torch.no_grad():
            return model_logps(self.reference, batch)[0]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, PreferenceOutput]:
        """-> (loss summed over the pairs, PreferenceOutput)."""
        # NOTE: the reference first: when it is the policy with adapters off (LoRA), the MoE layers'
        # records must end up the policy's (expert loads, aux loss).
        reference_logps = self.reference_logps(batch)
        logps, tokens, output = model_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = preference_loss(logps, reference_logps, tokens, self.settings)
        chosen_logps, rejected_logps = logps.chunk(2)
        nll = -chosen_logps / tokens.chunk(2)[0]  # the chosen answer's mean token NLL
        if self.settings.sft_loss_ratio:
            losses = losses + self.settings.sft_loss_ratio * nll
        sums = torch.stack([
            chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).float().sum(),
            chosen_logps.detach().sum(), rejected_logps.detach().sum(), nll.detach().sum(),
        ])  # fmt: skip
        return losses.sum(), PreferenceOutput(getattr(output, "aux_loss", None), sums)

    def step_metrics(self, sums: torch.Tensor, pairs: int) -> dict[str, float]:
        """A step's metrics (TRL's names) from its ``metric_sums`` summed over micro-batches and ranks."""
        means = {name: float(value) / pairs for name, value in zip(METRICS, sums)}
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        if not self.settings.sft_loss_ratio:
            del means["nll_loss"]
        return means


# ----- the recipe's checks ---------------------------------------------------------------------
def is_preference_data(dataset_component) -> bool:
    return isinstance(dataset_component, type) and issubclass(dataset_component, PairDataset)


def check_preference_recipe(config: RecipeConfig) -> None:
    """A ``dpo:`` section needs preference data (and preference data a ``dpo:`` section), and no
    layout or loss it cannot run with; a ValueError naming the key otherwise."""
    datasets = [("dataset", config.dataset), ("validation_dataset", config.validation_dataset)]
    for key, section in datasets:
        if section is None:
            continue
        pairs = is_preference_data(section.component)
        if config.dpo is None and pairs:
            raise ValueError(f"{key} {section.target} holds preference pairs: add a dpo: section (e.g. dpo: {{beta: 0.1}})")
        if config.dpo is not None and not pairs:
            raise ValueError(
                f"dpo: trains on preference pairs, but {key} is {section.target}; use "
                "ernie45.training.preference.PreferenceDataset (or SyntheticPreference)"
            )
    if config.dpo is None:
        return
    if config.distributed.cp_size > 1:
        raise ValueError("dpo: with distributed.cp_size > 1 is not supported (sequence log-probs need whole sequences); use cp_size=1")
    if config.distributed.pp_size > 1:
        raise ValueError("dpo: with distributed.pp_size > 1 is not supported yet; use pp_size=1")
    if config.packed_sequence.packed_sequence_size:
        raise ValueError("dpo: with packed_sequence.packed_sequence_size is not supported (a pair is one row each); set it to 0")
    if config.loss_fn.component is FusedLinearCrossEntropy:
        raise ValueError(f"dpo: computes its own loss from the logits; loss_fn {config.loss_fn.target} does not apply: remove loss_fn")
