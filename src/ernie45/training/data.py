"""Training data: records -> token ids with loss labels -> padded micro-batches, in a layout-free order.

Datasets (``_target_`` in the recipe; each a class built with the section's keys):
  * HellaSwag: ``{"ctx", "endings", "label"}`` lines; the model reads the context and learns the gold
    ending (loss on the ending's tokens only).
  * SFTDataset: ``{"prompt", "completion"}`` lines (loss on the completion + EOS), or chat
    ``{"messages": [{"role", "content"}, ...]}`` lines rendered with the tokenizer's chat template
    (loss on the assistant turns only).
  * SyntheticMultipleChoice: the seeded HellaSwag-format task of ``synthetic.py``.
A local path is read as JSONL; anything else is a hub id loaded with ``datasets`` (online only).
``DataLoader`` (the ``dataloader`` sections) pads the examples a sampler picks into batches.

Order: the examples of one optimizer step (a *global batch*) are chosen from a seeded permutation
per epoch, independent of the number of ranks; each rank takes every dp-th micro-batch of it. So
the loss curve does not depend on the parallel layout, and resuming at step N needs only N.
"""

from __future__ import annotations

import bisect
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ..evaluation import example_from_record
from ..jsonl import iter_jsonl, json_type, text_field
from ..models.loss import IGNORE_INDEX

if TYPE_CHECKING:  # NOTE: config.py imports this module (through the registry); only the type is needed here
    from .config import DatasetConfig


@dataclass(frozen=True)
class TokenizedExample:
    """input_ids and labels of one sequence (labels[i] = input_ids[i] where the loss applies, else -100).

    A packed row (``pack_examples``) also has ``position_ids``, restarting at 0 for each document.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    @property
    def num_label_tokens(self) -> int:
        """Tokens that are predicted (the first position is never a target after the causal shift)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


# ----- reading records -------------------------------------------------------------------------
def read_hub(name: str, split: str, limit: int | None) -> list[dict]:
    """A hub dataset's ``split`` through ``datasets``: from the Hugging Face cache, else downloaded."""
    from huggingface_hub import constants

    advice = f"or pass a local JSONL file (the cache is under HF_HOME={constants.HF_HOME})"
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"path_or_dataset={name!r} is not a local file, and reading hub datasets needs the `datasets` "
            f"package (pip install datasets), which reads them from the cache or downloads them; {advice}"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # NOTE: offline, not cached, no such dataset or split: one advice for all
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"path_or_dataset={name!r} (split {split!r}) cannot be read from the cache or the hub ({reason}); {advice}") from None
    rows = data if limit is None else data.select(range(min(limit, len(data))))
    return [dict(row) for row in rows]


def read_file_or_hub(
    path_or_dataset: str, split: str, limit: int | None, check: Callable[[dict, str], object]
) -> list[dict]:
    """The first ``limit`` records of a local JSONL file, or of a hub dataset's ``split``, each given to
    ``check`` with where it is ("file:line"), so that a bad field is named where the user can fix it."""
    path = Path(path_or_dataset).expanduser()
    if path.is_file():
        located = list(islice(iter_jsonl(path), limit))
    elif path.suffix in (".jsonl", ".json") or path.is_absolute() or path.exists():
        raise ValueError(f"dataset file {path} does not exist (path_or_dataset)")
    else:
        rows = read_hub(path_or_dataset, split, limit)
        located = [(f"{path_or_dataset} ({split}) row {i}", row) for i, row in enumerate(rows)]
    for where, record in located:
        check(record, where)
    return [record for _, record in located]


def load_records(config: DatasetConfig) -> list[dict]:
    """The raw records of a dataset section (``num_samples_limit`` of them after ``sample_offset``)."""
    return config.build().load()


def record_texts(record: dict) -> list[str]:
    """The texts of a record (HellaSwag, prompt/completion, chat or preference pairs), to train a tokenizer on."""
    texts = [record.get("ctx"), *record.get("endings", []), *(record.get(key) for key in ("prompt", "completion", "chosen", "rejected"))]
    lists = [record.get(key) for key in ("messages", "prompt", "chosen", "rejected")]  # NOTE: preference records may hold chats
    texts += [m.get("content") for messages in lists if isinstance(messages, list) for m in messages if isinstance(m, dict)]
    return [t for t in texts if isinstance(t, str)]


def is_multiple_choice(config: DatasetConfig) -> bool:
    """Whether the section's records are HellaSwag-format multiple choice (scored for accuracy)."""
    return config.component.multiple_choice


# ----- tokenising ------------------------------------------------------------------------------
def encode_segments(tokenizer, segments: list[tuple[str, bool]], first_with_special: bool = True) -> TokenizedExample:
    """Concatenate (text, trained?) segments; only trained segments get labels."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=first_with_special and i == 0)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids, labels)


def hellaswag_segments(record: dict, where: str) -> list[tuple[str, bool]]:
    """Context, then " " + the gold ending; parsed and cleaned exactly as the HellaSwag scorer does."""
    example = example_from_record(record, where)
    return [(example.context, False), (" " + example.endings[example.label], True)]


def chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Split the rendered chat into pieces so that only assistant replies carry loss.

    Each piece is the difference between renderings of successive message prefixes; an assistant
    turn is split further into its header ("Assistant: ", the generation prompt) and its reply.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where} has chat messages but the tokenizer has no chat_template")

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(i, generation_prompt=True)
            segments.append((header[len(done):], False))
            done = header
        full = render(i + 1)
        if not full.startswith(done):
            raise ValueError(f"{where}: the chat template does not render message prefixes as prefixes")
        segments.append((full[len(done):], message["role"] == "assistant"))
        done = full
    return [(text, trained) for text, trained in segments if text]


def check_messages(messages, where: str, field: str = "messages") -> None:
    """``messages`` (a record's ``field``) must be a non-empty list of {role, content} strings."""
    if not (isinstance(messages, list) and messages):
        raise ValueError(f"{where}: {field} must be a non-empty list of {{role, content}} objects, got {json_type(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {field}[{i}] must be an object with role and content, got {json_type(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"{where}: {field}[{i}].{key} must be a string, got {json_type(message.get(key))}")


def check_sft_record(record: dict, where: str) -> None:
    """A prompt/completion record, or a chat record of {role, content} messages, with string fields."""
    if "messages" in record:
        check_messages(record["messages"], where)
    elif "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            text_field(record, key, where)
    else:
        raise ValueError(f"{where} needs prompt + completion, or messages; it has {sorted(record)}")


def sft_segments(tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
    check_sft_record(record, where)
    if "messages" in record:
        return chat_segments(tokenizer, record["messages"], where)
    eos = tokenizer.eos_token or ""
    return [(record["prompt"], False), (record["completion"] + eos, True)]


def tokenize_records(config: DatasetConfig, records: list[dict], tokenizer) -> list[TokenizedExample]:
    """Token ids + labels for every record; sequences with nothing left to learn are dropped."""
    return config.build().tokenize(records, tokenizer)


# ----- the datasets a recipe names -------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RecordDataset(ABC):
    """A dataset section, built: where its records come from and which of their tokens carry loss."""

    multiple_choice: ClassVar[bool] = False  # HellaSwag-format records, scored for accuracy
    sample_offset: int = 0
    num_samples_limit: int | None = None
    seq_length: int | None = None

    @property
    @abstractmethod
    def name(self) -> str:
        """How error messages call the dataset."""

    @abstractmethod
    def read(self, limit: int | None) -> list[dict]:
        """The first ``limit`` records (all when None)."""

    @abstractmethod
    def segments(self, tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
        """The record as (text, trained?) pieces."""

    def load(self) -> list[dict]:
        """``num_samples_limit`` records after the first ``sample_offset``."""
        offset = self.sample_offset
        limit = offset + self.num_samples_limit if self.num_samples_limit is not None else None
        records = self.read(limit)[offset:]
        if not records:
            raise ValueError(f"dataset {self.name} has no records")
        return records

    def tokenize(self, records: list[dict], tokenizer) -> list[TokenizedExample]:
        """Token ids + labels for every record; sequences with nothing left to learn are dropped."""
        examples = []
        for i, record in enumerate(records):
            segments = self.segments(tokenizer, record, f"{self.name} record {i}")
            example = self.encode(tokenizer, segments, chat="messages" in record)
            if example.num_label_tokens:
                examples.append(example)
        if not examples:
            raise ValueError(f"dataset {self.name}: no example has a label token left (seq_length={self.seq_length})")
        return examples

    def encode(self, tokenizer, segments: list[tuple[str, bool]], chat: bool) -> TokenizedExample:
        """Token ids + labels of ``segments``, cut to ``seq_length`` (a chat template writes its own BOS)."""
        example = encode_segments(tokenizer, segments, first_with_special=not chat)
        if self.seq_length is None:
            return example
        return TokenizedExample(example.input_ids[: self.seq_length], example.labels[: self.seq_length])


@dataclass(frozen=True, kw_only=True)
class FileDataset(RecordDataset):
    """Records from a local JSONL file, or a hub dataset's ``split`` (with ``datasets``, online)."""

    path_or_dataset: str
    split: str = "train"

    @property
    def name(self) -> str:
        return self.path_or_dataset

    def read(self, limit: int | None) -> list[dict]:
        return read_file_or_hub(self.path_or_dataset, self.split, limit, self.check)

    @abstractmethod
    def check(self, record: dict, where: str) -> None:
        """Refuse a record whose fields do not fit the dataset, naming ``where`` and the field."""


@dataclass(frozen=True, kw_only=True)
class HellaSwag(FileDataset):
    """``{"ctx", "endings", "label"}`` records; the loss is on the gold ending."""

    multiple_choice: ClassVar[bool] = True

    def check(self, record: dict, where: str) -> None:
        example_from_record(record, where)

    def segments(self, tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
        return hellaswag_segments(record, where)


@dataclass(frozen=True, kw_only=True)
class SFTDataset(FileDataset):
    """Prompt/completion or chat-messages records; the loss is on the completion or the assistant turns."""

    def check(self, record: dict, where: str) -> None:
        check_sft_record(record, where)

    def segments(self, tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
        return sft_segments(tokenizer, record, where)


# ----- packing ---------------------------------------------------------------------------------
def pack_examples(
    examples: list[TokenizedExample], packed_sequence_size: int, split_across_pack: bool = False
) -> list[TokenizedExample]:
    """Whole examples packed into rows of at most ``packed_sequence_size`` tokens (AutoModel's names).

    ``split_across_pack=False``: best-fit decreasing over whole examples (deterministic: ties keep
    file order); an example longer than a row is an error. ``True``: the examples laid end to end
    and cut every ``packed_sequence_size`` tokens (no padding; a piece that starts a row loses the
    one label its previous token would have predicted). In a row each document's positions restart
    at 0 and its first token has no label, so no token is predicted from another document; the
    model attends within documents (``position_ids``).
    """
    if packed_sequence_size < 1:
        raise ValueError(f"packed_sequence.packed_sequence_size={packed_sequence_size} must be >= 1 (0 turns packing off)")
    if split_across_pack:
        return _cut_into_rows(examples, packed_sequence_size)
    longest = max(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    if len(examples[longest].input_ids) > packed_sequence_size:
        raise ValueError(
            f"example {longest} has {len(examples[longest].input_ids)} tokens, more than "
            f"packed_sequence.packed_sequence_size={packed_sequence_size}; raise the size or set "
            "packed_sequence.split_across_pack: true"
        )
    # NOTE: best-fit decreasing (the fullest row that still has room), found by bisection over the
    # rows sorted by free room: O(n log n), as tight as first-fit decreasing.
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
        size = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([])
            room, row = packed_sequence_size, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (room - size, row))
    return [_packed_row([_document(examples[i]) for i in sorted(row)]) for row in rows]


def _document(example: TokenizedExample, start: int = 0) -> TokenizedExample:
    """``example`` as one document of a packed row: positions from ``start``, first label dropped."""
    labels = [IGNORE_INDEX, *example.labels[1:]]
    return TokenizedExample(example.input_ids, labels, list(range(start, start + len(example.input_ids))))


def _packed_row(documents: list[TokenizedExample]) -> TokenizedExample:
    return TokenizedExample(
        [t for d in documents for t in d.input_ids],
        [t for d in documents for t in d.labels],
        [p for d in documents for p in d.position_ids],
    )


def _cut_into_rows(examples: list[TokenizedExample], size: int) -> list[TokenizedExample]:
    """Examples end to end, cut every ``size`` tokens; a piece keeps its positions in its example."""
    stream = [_document(ex) for ex in examples]
    ids = [t for d in stream for t in d.input_ids]
    labels = [t for d in stream for t in d.labels]
    positions = [p for d in stream for p in d.position_ids]
    rows = []
    for start in range(0, len(ids), size):
        row_labels = labels[start : start + size]
        row_labels[0] = IGNORE_INDEX  # NOTE: its predictor is the previous row's last token
        rows.append(TokenizedExample(ids[start : start + size], row_labels, positions[start : start + size]))
    return rows


# ----- batching --------------------------------------------------------------------------------
def collate(examples: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to a common length (a multiple of ``pad_to_multiple_of``).

    Returns input_ids [B,S], labels [B,S] (-100 on padding), attention_mask [B,S] (1 = token),
    padding_mask [B,S] (True = padding), and for packed rows position_ids [B,S] (restarting at 0
    for each document; 0 on padding).
    """
    longest = max(len(ex.input_ids) for ex in examples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    packed = any(ex.position_ids is not None for ex in examples)
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.tensor(ex.position_ids if ex.position_ids is not None else range(n))
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "padding_mask": attention_mask == 0}
    return batch | ({"position_ids": position_ids} if packed else {})


class GlobalBatchSampler:
    """Which examples form optimizer step ``step``, and which of them a rank processes.

    Step s of the run lies in epoch ``s // steps_per_epoch``; each epoch has its own seeded
    permutation (or file order without shuffling) and drops its incomplete last global batch.
    """

    def __init__(self, num_examples: int, global_batch_size: int, local_batch_size: int, seed: int, shuffle: bool):
        if num_examples < global_batch_size:
            raise ValueError(
                f"the training set has {num_examples} examples, fewer than step_scheduler.global_batch_size="
                f"{global_batch_size}"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        indices = list(range(self.num_examples))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(indices)
        return indices

    def global_batch(self, step: int) -> list[int]:
        position = step % self.steps_per_epoch
        start = position * self.global_batch_size
        return self.order(self.epoch_of(step))[start : start + self.global_batch_size]

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: every dp_size-th one, starting at dp_rank."""
        batch = self.global_batch(step)
        micro = [batch[i : i + self.local_batch_size] for i in range(0, len(batch), self.local_batch_size)]
        return micro[dp_rank::dp_size]


class DataLoader:
    """Tokenized examples -> padded batches (``collate_fn``), for index lists a sampler chooses.

    Training takes its steps' indices from ``sampler()`` (``shuffle``: a new seeded order every
    epoch); validation takes consecutive ``batch_size`` runs in file order from ``batches()``.
    """

    def __init__(
        self,
        examples: list[TokenizedExample],
        pad_id: int,
        collate_fn: Callable = collate,
        shuffle: bool = True,
        pad_to_multiple_of: int = 8,
        batch_size: int | None = None,
    ):
        self.examples = examples
        self.pad_id = pad_id
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.pad_to_multiple_of = pad_to_multiple_of
        self.batch_size = batch_size

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collate_fn([self.examples[i] for i in indices], self.pad_id, self.pad_to_multiple_of)

    def sampler(self, global_batch_size: int, local_batch_size: int, seed: int) -> GlobalBatchSampler:
        return GlobalBatchSampler(len(self.examples), global_batch_size, local_batch_size, seed, self.shuffle)

    def batches(self) -> list[list[int]]:
        """Consecutive runs of ``batch_size`` indices, in file order."""
        if self.batch_size is None:
            raise ValueError("batches() needs the data loader's batch_size")
        size, count = self.batch_size, len(self.examples)
        return [list(range(i, min(i + size, count))) for i in range(0, count, size)]
