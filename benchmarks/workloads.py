"""The benchmark workloads and their HF checkpoints (random weights saved by transformers).

Each workload is an HF config plus the token shapes of its measurements. Checkpoints are written
once per (workload, dtype) by transformers' ``save_pretrained`` into a cache directory, so ours and
transformers load the very same files, and later runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DTYPES = ("bfloat16", "float32")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ernie45-bench"
MAX_POSITIONS = 4096  # max_position_embeddings of every workload: the longest sequence measured


@dataclass(frozen=True)
class Workload:
    """One model shape and the token shapes measured on it."""

    name: str
    kind: str  # "dense" (transformers' Ernie4_5) or "moe" (Ernie4_5_Moe)
    config: dict = field(hash=False)
    batch: int = 1
    seq_len: int = 1024  # train / forward tokens per sequence
    prompt_len: int = 64  # decode: prompt tokens, then new_tokens greedy steps
    new_tokens: int = 32

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        # The ERNIE-4.5-0.3B release shape.
        Workload(
            "dense-0.3b",
            "dense",
            dict(
                hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
                num_key_value_heads=2, head_dim=128, vocab_size=103424, tie_word_embeddings=True,
            ),
        ),  # fmt: skip
        # ERNIE-4.5-21B-A3B scaled down: layer 0 dense, then MoE layers (64 experts, top-6, 2 shared).
        Workload(
            "mini-moe",
            "moe",
            dict(
                hidden_size=1024, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=103424, tie_word_embeddings=True, moe_num_experts=64,
                moe_k=6, moe_intermediate_size=256, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=-1, moe_layer_interval=1,
            ),
        ),  # fmt: skip
        # Launch overhead: so small that kernel launches and Python dominate.
        Workload(
            "tiny",
            "dense",
            dict(
                hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=True,
            ),
            seq_len=64,
            prompt_len=16,
            new_tokens=32,
        ),  # fmt: skip
    )
}


def hf_config(workload: Workload):
    """The transformers config object of a workload."""
    from transformers import Ernie4_5Config, Ernie4_5_MoeConfig

    config_class = Ernie4_5_MoeConfig if workload.kind == "moe" else Ernie4_5Config
    return config_class(**workload.config, max_position_embeddings=MAX_POSITIONS)


def hf_model_class(workload: Workload):
    from transformers import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM

    return Ernie4_5_MoeForCausalLM if workload.kind == "moe" else Ernie4_5ForCausalLM


def checkpoint_key(workload: Workload, dtype: str, seed: int) -> str:
    """A directory name that changes whenever the saved weights would."""
    payload = json.dumps([asdict(workload)["config"], workload.kind, dtype, seed], sort_keys=True)
    return f"{workload.name}-{dtype}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def write_checkpoint(workload: Workload, dtype: str, directory: Path, seed: int = 0) -> None:
    """Random transformers model -> ``directory`` via ``save_pretrained`` (weights in ``dtype``).

    NOTE: built with transformers' own ``from_config(dtype=...)`` so that its fp32-only tensors
    (MoE router weight and correction bias) stay fp32 in a bf16 checkpoint, as in Baidu's releases.
    """
    import torch

    torch.manual_seed(seed)
    model = hf_model_class(workload)._from_config(hf_config(workload), dtype=getattr(torch, dtype))
    model.save_pretrained(directory)


def ensure_checkpoint(workload: Workload, dtype: str, cache_dir: Path, seed: int = 0) -> Path:
    """The checkpoint directory of (workload, dtype), written first if the cache lacks it."""
    directory = Path(cache_dir) / checkpoint_key(workload, dtype, seed)
    done = directory / "DONE"
    if not done.is_file():
        write_checkpoint(workload, dtype, directory, seed)
        done.write_text("complete\n")
    return directory


HELLASWAG_TOKENIZER_VOCAB = 16384  # at most; never more than the workload's vocab_size


def ensure_hellaswag_tokenizer(data: Path, workload: Workload, cache_dir: Path) -> Path:
    """A byte-level BPE trained on the first 2,000 records of the HellaSwag file ``data`` (no ERNIE
    tokenizer can be downloaded here), its ids within ``workload``'s vocabulary, saved once under
    ``cache_dir``; both libraries load it."""
    from ernie45.evaluation import load_hellaswag
    from ernie45.tokenizer import train_tokenizer

    vocab = min(HELLASWAG_TOKENIZER_VOCAB, workload.config["vocab_size"])
    payload = json.dumps([str(Path(data).resolve()), Path(data).stat().st_size, vocab])
    directory = Path(cache_dir) / f"hellaswag-tokenizer-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"
    done = directory / "DONE"
    if not done.is_file():
        examples = load_hellaswag(data, limit=2000)
        texts = [ex.context for ex in examples] + [ending for ex in examples for ending in ex.endings]
        train_tokenizer(texts, vocab).save_pretrained(directory)
        done.write_text("complete\n")
    return directory
