"""A small byte-level BPE tokenizer in ERNIE 4.5's conventions, trained on the fly.

No tokenizer can be downloaded here, so demos, tests and the embedded default run train one from
text in a second or two. It is a real ``transformers`` fast tokenizer: ``save_pretrained`` writes
the usual files and ``AutoTokenizer.from_pretrained`` loads them back. Special tokens follow the
released ERNIE 4.5 checkpoints: ``<unk>`` (id 0, also padding), ``<s>`` (1), ``</s>`` (2), and the
chat markers ``<|begin_of_sentence|>`` / ``<|end_of_sentence|>`` used by the chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# What a tokenizer directory holds: a fast tokenizer, its config, a SentencePiece model, or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]

# ERNIE 4.5's chat format: "User: ...\n" turns, "Assistant: ...<|end_of_sentence|>" replies.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (any text encodes, unseen words fall back to bytes)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<|begin_of_sentence|>",
        sep_token="<|end_of_sentence|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether ``path`` holds any tokenizer file (a model exported without its tokenizer holds none)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
