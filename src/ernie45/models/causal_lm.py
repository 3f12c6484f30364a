"""What the dense and MoE causal LMs share: the LM head, construction, HF checkpoint I/O.

Construction: ``from_config`` builds directly in the requested dtype/device; ``from_pretrained``
builds on the meta device and streams the checkpoint in (no random init, no second copy).
Tensors that must stay fp32 (router weight, correction bias, RoPE frequencies) are created fp32
explicitly and protected from ``.to(dtype)``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import generation
from ..checkpoint.hf_checkpoint import (
    CheckpointFiles,
    checkpoint_dtype,
    load_config,
    load_hf_weights,
    save_hf_checkpoint,
)
from .backend import BackendConfig
from .capabilities import ModelCapabilities
from ..dtypes import as_dtype, config_dtype
from .decoder import head_dim_of
from .loss import shifted_cross_entropy
from .rope import RotaryEmbedding


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device | str | None):
    """Create modules with ``dtype`` as the default float dtype on ``device``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def keep_logits(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """0 keeps all positions, int N the last N, a 1-D index tensor those positions."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


class Ernie4_5CausalLMBase(nn.Module):
    """Decoder + LM head (tied to the embedding when ``tie_word_embeddings``)."""

    model_type: str = ""
    lm_head_bias: bool = False

    def __init__(self, config, backend: BackendConfig | None = None):
        super().__init__()
        self.config = config
        self.backend = backend or BackendConfig()
        self.model = self.build_model()
        head_bias = bool(config.use_bias) and self.lm_head_bias
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=head_bias)
        self.tie_weights()

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    # ----- embeddings -------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.model.embed_tokens = embedding
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.lm_head = head
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head iff the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        **attn_kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B,S] -> logits [B,S',V]; ``labels`` (-100 = ignore) adds HF's shifted loss."""
        hidden, all_hidden = self.model(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            output_hidden_states=bool(output_hidden_states),
            **attn_kwargs,
        )
        logits = self.lm_head(keep_logits(hidden, logits_to_keep))
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return self.make_output(loss=loss, logits=logits, hidden_states=all_hidden)

    def make_output(self, **fields) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(**fields)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Prompt + new tokens [B,P+N] with a KV cache, like transformers; see ``ernie45.generation.generate``."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ----- construction and checkpoints -------------------------------------------------------
    @classmethod
    def _check_config(cls, config) -> None:
        if getattr(config, "model_type", None) != cls.model_type:
            raise ValueError(
                f"{cls.__name__} needs a config with model_type={cls.model_type!r}, got "
                f"{getattr(config, 'model_type', None)!r}; use ernie45.from_pretrained to pick the class"
            )
        heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        if head_dim_of(config) % 2:
            raise ValueError(f"head_dim={head_dim_of(config)} must be even for rotary embeddings")

    @classmethod
    def from_config(
        cls,
        config,
        backend: BackendConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Ernie4_5CausalLMBase":
        """A randomly initialised model (HF's init: normal(0, initializer_range), norms 1, biases 0)."""
        cls._check_config(config)
        with _building(as_dtype(dtype) or config_dtype(config), device):
            model = cls(config, backend=backend, **kwargs)
        model.init_weights()
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        backend: BackendConfig | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Ernie4_5CausalLMBase":
        """Load an HF checkpoint directory; dtype defaults to the checkpoint's."""
        config = load_config(path)
        cls._check_config(config)
        files = CheckpointFiles(path)
        dtype = as_dtype(dtype) or checkpoint_dtype(files)
        with _building(dtype, "meta"):
            model = cls(config, backend=backend, **kwargs)
        load_hf_weights(model, files, device=device or "cpu")
        model.materialize_buffers()
        model.tie_weights()
        model.generation_config = generation.load_generation_config(path)  # end/pad tokens for generate
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors in the HF layout (tied head omitted), written atomically."""
        save_hf_checkpoint(self, path, max_shard_size=max_shard_size)

    def materialize_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE frequencies) after a meta-device build."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                if module.inv_freq.is_meta:
                    module.inv_freq = torch.empty(0, device=self.lm_head.weight.device)
                module.reset_inv_freq()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif module is not self and hasattr(module, "init_weights"):
                module.init_weights(std)  # e.g. grouped experts and the router
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
        self.materialize_buffers()
        self.tie_weights()

    # ----- accounting (from the config, so it holds for meta-device and sharded models) ---------
    def _attention_counts(self) -> tuple[int, int]:
        """(parameters, matmul weights) of one attention block."""
        c = self.config
        heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
        q_width, kv_width = heads * head_dim_of(c), kv * head_dim_of(c)
        weights = c.hidden_size * (2 * q_width + 2 * kv_width)
        biases = q_width + 2 * kv_width + c.hidden_size if c.use_bias else 0
        return weights + biases, weights

    def _feed_forward_counts(self, layer_idx: int) -> tuple[int, int, int]:
        """(parameters, parameters used per token, matmul weights used per token) of one layer's MLP."""
        c = self.config
        weights = 3 * c.hidden_size * c.intermediate_size
        params = weights + (2 * c.intermediate_size + c.hidden_size if c.use_bias else 0)
        return params, params, weights

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count as transformers' ``num_parameters()`` counts it (tied head once; the MoE
        correction bias included). ``active_only``: those one token uses (K of E routed experts)."""
        c = self.config
        hidden, vocab = c.hidden_size, c.vocab_size
        total = vocab * hidden + hidden  # embedding, final norm
        if not c.tie_word_embeddings:
            total += vocab * hidden + (vocab if c.use_bias and self.lm_head_bias else 0)
        attention, _ = self._attention_counts()
        for i in range(c.num_hidden_layers):
            params, active, _ = self._feed_forward_counts(i)
            total += attention + 2 * hidden + (active if active_only else params)
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token: ``6 * matmul weights used per token +
        12 * layers * heads * head_dim * seq_len`` (PaLM/torchtitan convention: attention counted
        as non-causal; the embedding lookup is free, the LM head matmul is counted even if tied)."""
        c = self.config
        _, attention = self._attention_counts()
        matmul = c.vocab_size * c.hidden_size
        for i in range(c.num_hidden_layers):
            matmul += attention + self._feed_forward_counts(i)[2]
        return 6 * matmul + 12 * c.num_hidden_layers * c.num_attention_heads * head_dim_of(c) * seq_len

    # ----- introspection ----------------------------------------------------------------------
    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        return ModelCapabilities(is_moe=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
