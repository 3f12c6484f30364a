"""Tiny random ERNIE 4.5 configs, models, checkpoints and data that several test files build.

Plain functions, one definition each (fixtures that wrap them live in conftest.py). Everything here
reads only the repository: the HellaSwag examples come from ``tests/assets``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Ernie4_5Config, Ernie4_5_MoeConfig
from transformers import Ernie4_5ForCausalLM as HFDense
from transformers import Ernie4_5_MoeForCausalLM as HFMoe

import ernie45
from ernie45 import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM
from ernie45.tokenizer import train_tokenizer

# The first 300 examples of the HellaSwag validation file (see tests/assets/README.md).
HELLASWAG = Path(__file__).resolve().parent / "assets" / "hellaswag_val_first300.jsonl"
TOKENIZER_VOCAB = 320
# NOTE: a large init spread makes tiny random models produce varied text instead of one repeated token.
VARIED = dict(initializer_range=0.3, tie_word_embeddings=False)


# ----- configs -------------------------------------------------------------------------------------
def tiny_dense_config(**overrides) -> Ernie4_5Config:
    values = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_bias=False,
    )
    values.update(overrides)
    return Ernie4_5Config(**values)


def tiny_moe_config(**overrides) -> Ernie4_5_MoeConfig:
    """Layer 0 dense, layers 1-2 MoE: 8 experts, top-2, one shared expert."""
    values = dict(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        tie_word_embeddings=True,
        use_bias=False,
        experts_implementation="eager",  # transformers' readable loop is the reference
    )
    values.update(overrides)
    return Ernie4_5_MoeConfig(**values)


# ----- random weights ------------------------------------------------------------------------------
@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Move norm weights away from 1 and biases away from 0, so mistakes there show in logits."""
    for name, param in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            param.add_(torch.randn_like(param) * scale)


@torch.no_grad()
def make_routing_matter(
    model: torch.nn.Module, favourite_experts: tuple[int, ...] = (), bias: float = 10.0, bias_std: float = 0.01
) -> None:
    """Input-dependent routing (router std 0.3, experts std 0.1, correction bias std ``bias_std``);
    a large ``bias`` on ``favourite_experts`` sends (nearly) every token to them."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("mlp.gate.weight"):
            tensor.normal_(0.0, 0.3)
        elif name.endswith("e_score_correction_bias"):
            tensor.normal_(0.0, bias_std)
            tensor[0, list(favourite_experts)] += bias
        elif ".experts." in name:
            tensor.normal_(0.0, 0.1)


def random_hf_model(hf_class, config, seed: int = 0):
    torch.manual_seed(seed)
    model = hf_class(config).eval()
    perturb_norms_and_biases(model)
    return model


def random_hf_moe(config: Ernie4_5_MoeConfig, seed: int = 0, bias_std: float = 0.01) -> HFMoe:
    """A transformers MoE model whose routing depends on the input; norms and biases moved off 1/0."""
    model = random_hf_model(HFMoe, config, seed)
    make_routing_matter(model, bias_std=bias_std)
    return model


def dense_model(seed: int = 0, **overrides) -> Ernie4_5ForCausalLM:
    """Our random fp32 dense model, identical in every process that asks with the same seed."""
    torch.manual_seed(seed)
    model = Ernie4_5ForCausalLM.from_config(tiny_dense_config(**overrides), dtype=torch.float32)
    perturb_norms_and_biases(model)
    return model


def moe_model(seed: int = 0, favourite_experts: tuple[int, ...] = (), **overrides) -> Ernie4_5_MoeForCausalLM:
    """Our random fp32 MoE model, identical in every process that asks with the same arguments."""
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM.from_config(tiny_moe_config(**overrides), dtype=torch.float32)
    perturb_norms_and_biases(model)
    make_routing_matter(model, favourite_experts)
    return model


def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


# ----- HellaSwag text, a trained tokenizer, a saved model -----------------------------------------
def hellaswag_records(limit: int) -> list[dict]:
    """The first ``limit`` records of the HellaSwag fixture, parsed here independently of ernie45."""
    with HELLASWAG.open() as lines:
        return [json.loads(line) for line, _ in zip(lines, range(limit))]


def training_texts() -> list[str]:
    """Real English (HellaSwag contexts and endings) plus chat words, to train the tokenizer on."""
    texts = [r["ctx"] + " " + " ".join(r["endings"]) for r in hellaswag_records(200)]
    return texts + ["User: hello there, how are you?\nAssistant: I am fine, thank you."] * 5


def save_tiny_lm(path: Path, seed: int = 0, moe: bool = False, **config_overrides) -> Path:
    """Save a tiny random dense (or MoE) model (our save_pretrained) and a trained tokenizer to ``path``."""
    tokenizer = train_tokenizer(training_texts(), vocab_size=TOKENIZER_VOCAB)
    values = dict(vocab_size=TOKENIZER_VOCAB, **VARIED)
    values.update(config_overrides)
    torch.manual_seed(seed)
    config = tiny_moe_config(**values) if moe else tiny_dense_config(**values)
    ernie45.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hub_cache_snapshot(hub_cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """The (new, empty) snapshot folder of ``repo_id`` in a Hugging Face hub cache, laid out as
    huggingface_hub lays it out: ``models--{namespace}--{name}/refs/main`` names ``snapshots/{commit}``."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


# ----- LoRA ----------------------------------------------------------------------------------------
def saved_hf_model(path: Path, kind: str, seed: int = 0):
    """(directory, model): a tiny random transformers model saved by transformers. "dense" has an
    untied LM head (so it can be adapted); "moe" has a correction bias large enough to change routing."""
    if kind == "dense":
        model = random_hf_model(HFDense, tiny_dense_config(tie_word_embeddings=False), seed)
    else:
        model = random_hf_moe(tiny_moe_config(), seed, bias_std=0.5)
    model.save_pretrained(path)
    return path, model


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA tensor (B included, which starts at zero) random values, so adapters matter."""
    from ernie45.peft import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(adapter_parameters(model).items()):
        param.copy_(torch.randn(param.shape, generator=generator) * std)
