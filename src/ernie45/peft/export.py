"""``ernie45 merge``: base checkpoint + LoRA adapter -> one full HF checkpoint (the adapter folded in)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..auto import from_pretrained
from .lora import merge

# NOTE: what transformers writes beside a tokenizer; copied so the merged model runs as it is.
TOKENIZER_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja")


def merge_checkpoint(base: str | Path, adapter: str | Path, output: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Load ``base`` with the PEFT adapter in ``adapter``, fold it in and save the result in ``output``
    (transformers' layout, dtype: the base's unless given), with the base's tokenizer files."""
    base, output = Path(base), Path(output)
    if output.resolve() == base.resolve():
        raise ValueError(f"--output {output} is the base model's directory; write the merged model elsewhere")
    model = merge(from_pretrained(base, dtype=dtype, adapter=adapter))
    model.save_pretrained(output)
    for name in TOKENIZER_EXTRAS:
        if (base / name).is_file() and not (output / name).exists():
            shutil.copyfile(base / name, output / name)
    return output
