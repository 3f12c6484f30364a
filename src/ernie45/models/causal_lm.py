"""What the dense and MoE causal LMs share: the decoder + LM head, the HF-style forward,
construction (``construction.py``), HF checkpoint I/O and the model's own accounting.

Tensors that must stay fp32 (router weight, correction bias, RoPE frequencies) are created fp32
explicitly and protected from ``.to(dtype)`` by the modules that own them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import generation
from ..checkpoint.hf_checkpoint import save_hf_checkpoint
from ..host_memory import keep_host_memory_by_default
from ..moe.config import MoEConfig
from . import accounting, construction
from .capabilities import ModelCapabilities
from .decoder import DecoderModel, tuple_when_asked
from .linear import Linear, set_prepacking
from .loss import causal_lm_loss
from .rope import RotaryEmbedding
from .transformers_methods import TransformersMethods


def keep_logits(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """0 keeps all positions, int N the last N, a 1-D index tensor those positions (of every row);
    a [B,S] boolean tensor those tokens, flattened to [N,H] in row-major order (scoring computes
    the head only where a token is scored, not for padding or context)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    if logits_to_keep.dtype == torch.bool:
        if logits_to_keep.shape != hidden.shape[:2]:
            raise ValueError(
                f"a boolean logits_to_keep marks tokens of input_ids {list(hidden.shape[:2])}, got shape "
                f"{list(logits_to_keep.shape)}; pass a [B,S] mask, an int or a 1-D index tensor of positions"
            )
        return hidden[logits_to_keep.to(hidden.device)]
    return hidden[:, logits_to_keep]


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B,S',H] -> logits [B,S',V]; no product at all when no position is kept.

    NOTE: a fused loss asks for no logits (it projects the hidden states itself), and under autocast
    even an empty product would cast the whole [V,H] head weight: on a CPU that is ~0.3 s of each
    training step, spent on nothing. The empty logits have the dtype the product would give.
    """
    if hidden.numel() > 0:
        return head(hidden)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    return hidden.new_empty((*hidden.shape[:-1], head.weight.shape[0]), dtype=dtype)


class Ernie4_5CausalLMBase(TransformersMethods, nn.Module):
    """``model`` (the decoder stack) + ``lm_head`` (tied to the embedding when ``tie_word_embeddings``).

    Subclasses build their decoder and pass it in; ``model_type`` is the config's ``model_type``
    they accept (the registry in registry.py maps one to the other).
    """

    model_type: str = ""
    moe_config: MoEConfig | None = None  # None: a dense model
    # NOTE: set by ernie45.distributed when this model holds only this rank's pipeline stages
    # (pp > 1; the others' modules are None or absent): such a model is run by ``pipeline.step``.
    pipeline = None

    def __init__(self, config, model: DecoderModel, lm_head_bias: bool):
        super().__init__()
        self.config = config
        self.backend = model.backend
        self.model = model
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=lm_head_bias)
        self.lm_head_bias = lm_head_bias  # NOTE: known also where a pipeline stage holds no head
        self.vocab_size = config.vocab_size
        self.tie_weights()
        set_prepacking(self, self.backend.prepack_cpu_inference)

    # ----- embeddings -------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.model.embed_tokens = embedding
        self.tie_weights()

    def get_decoder(self) -> nn.Module:
        """The decoder stack (``model``), as transformers names the accessor."""
        return self.model

    base_model_prefix = "model"

    @property
    def base_model(self) -> nn.Module:
        """The decoder stack, by transformers' other name (TRL's fused head runs it)."""
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.lm_head = head
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head iff the config says so (a pipeline stage that
        holds only one of them keeps it as its own tensor)."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----- forward ----------------------------------------------------------------------------
    # NOTE: transformers' Trainer reads both: it then passes num_items_in_batch (token-weighted gradient
    # accumulation), counting the labels a shifted causal-LM loss scores (not each row's first)
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    @tuple_when_asked
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: list | None = None,
        past_key_values: list | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
    ) -> CausalLMOutputWithPast:
        """input_ids [B,S] -> logits [B,S',V] (or [N,V] for a boolean ``logits_to_keep``, see
        ``keep_logits``), with transformers' arguments and output class.

        The decoder's keywords are ``DecoderModel.forward``'s (masks, positions, embeddings, KV
        caches). ``labels`` (-100 = ignore) adds HF's shifted mean loss (``shift_labels``: already
        shifted; ``num_items_in_batch``: the summed loss over that count, as transformers' Trainer
        asks). ``output_router_logits``: MoE models only. Keyword-only after ``input_ids`` (as
        AutoModel): transformers orders these arguments differently, so a positional call would
        silently mean something else. Every keyword is named here (libraries such as transformers'
        Trainer read the signature to decide which batch fields to pass); any other is a TypeError.
        """
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: the attention kernels never form the weights")
        if self.pipeline is not None:
            raise RuntimeError(
                f"this model holds {self.pipeline}, so it has no forward of its own: train it with "
                "model.pipeline.step(...); generation and evaluation need the whole model (load it with pp=1)"
            )
        first_input = input_ids if input_ids is not None else inputs_embeds
        if first_input is not None and first_input.device.type == "cpu" and not torch.compiler.is_compiling():
            keep_host_memory_by_default()  # NOTE: ~10% of a CPU forward is fresh pages otherwise (host_memory.py)
        out = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, padding_mask=padding_mask,
            inputs_embeds=inputs_embeds, cache=cache, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = head_logits(self.lm_head, keep_logits(out.last_hidden_state, logits_to_keep))
        loss = causal_lm_loss(logits, labels, shift_labels, num_items_in_batch)
        return self.causal_lm_output(loss, logits, out, output_router_logits)

    def causal_lm_output(self, loss, logits, out, output_router_logits: bool | None) -> CausalLMOutputWithPast:
        """The forward's output class (the MoE model adds its router outputs)."""
        if output_router_logits:
            raise ValueError("output_router_logits=True: a dense model has no router")
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    main_input_name = "input_ids"  # transformers' name, read by libraries that drive generate()

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Prompt + new tokens [B,P+N] with a KV cache, like transformers; see ``ernie45.generation.generate``."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ----- construction and checkpoints -------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config,
        backend=None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Ernie4_5CausalLMBase":
        """A randomly initialised model (HF's init: normal(0, initializer_range), norms 1, biases 0)."""
        return construction.build(cls, config, dtype=dtype, device=device, backend=backend, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        backend=None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Ernie4_5CausalLMBase":
        """Load an HF checkpoint directory; dtype defaults as transformers' (config.json's, else the weights')."""
        return construction.load_pretrained(cls, path, dtype=dtype, device=device, backend=backend, **kwargs)

    def save_pretrained(
        self,
        path: str | Path,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        is_main_process: bool = True,
        push_to_hub: bool = False,
    ) -> None:
        """config.json + safetensors in the HF layout (tied head omitted), written atomically.

        transformers' keywords that scripts pass are taken: ``safe_serialization`` (safetensors is
        the only format written), ``is_main_process`` (ignored: a parallel model's ranks all call
        this and rank 0 writes), ``push_to_hub`` (refused: nothing is uploaded from here).
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: ernie45 writes safetensors only (transformers and vLLM read them)")
        if push_to_hub:
            raise ValueError("push_to_hub=True: ernie45 does not upload; save here, then `hf upload REPO PATH`")
        del is_main_process
        save_hf_checkpoint(self, path, max_shard_size=max_shard_size)

    def materialize_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE frequencies) after a meta-device build."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_inv_freq(self.device if module.inv_freq.is_meta else None)

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

    # ----- accounting (from the config: holds for meta-device and sharded models) --------------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False, active_only: bool = False) -> int:
        """Parameter count as transformers' ``num_parameters()`` counts it (tied head once; the MoE
        correction bias included), from the config, so a meta or sharded model counts the whole.
        ``exclude_embeddings``: without the input embedding (an untied head still counts);
        ``only_trainable``: the parameters that require grad (what this process holds, whole);
        ``active_only``: those one token uses (K of E routed experts)."""
        if only_trainable:
            total = sum(p.numel() for p in self.parameters() if p.requires_grad)
            embedding = self.get_input_embeddings()
            trained_embedding = embedding is not None and embedding.weight.requires_grad
            return total - (embedding.weight.numel() if exclude_embeddings and trained_embedding else 0)
        total = accounting.num_parameters(self.config, self.moe_config, active_only, self.lm_head_bias)
        return total - (self.config.vocab_size * self.config.hidden_size if exclude_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (see ``accounting.flops_per_token``)."""
        return accounting.flops_per_token(self.config, seq_len, self.moe_config)

    # ----- introspection ----------------------------------------------------------------------
    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        return ModelCapabilities(is_moe=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._first_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._first_weight().device

    def _first_weight(self) -> torch.Tensor:
        """The embedding, or on a later pipeline stage the first weight it holds (a norm's, in the model dtype)."""
        embedding = self.model.embed_tokens
        return embedding.weight if embedding is not None else next(self.parameters())
