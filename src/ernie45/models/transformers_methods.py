"""transformers' ``PreTrainedModel`` methods that training libraries call on a model (its Trainer,
TRL's trainers, PEFT): vocabulary resizing, the activation-checkpointing switches, model-card
tags and input gradients. A mixin of the causal LMs (causal_lm.py); the work is done by
ernie45's own pieces (resize.py, ``ernie45.distributed.activation_checkpoint``).
"""

from __future__ import annotations

from torch import nn

from ..checkpoint.hf_checkpoint import is_adapter_tensor
from ..sharding import is_dtensor
from . import resize


class TransformersMethods:
    """Mixed into ``Ernie4_5CausalLMBase`` (which provides ``model``, ``lm_head``, ``config``, ``pipeline``)."""

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """transformers' method: embedding, LM head and ``config.vocab_size`` resized to ``new_num_tokens``
        (e.g. ``len(tokenizer)`` after adding tokens) rounded up to ``pad_to_multiple_of``; added rows
        as transformers draws them (``resize.py``). Returns the input embedding."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        size = resize.padded_size(new_num_tokens, old.num_embeddings, pad_to_multiple_of)
        if size == old.num_embeddings:
            return old
        if self.pipeline is not None or any(is_dtensor(p) for p in (old.weight, self.lm_head.weight)):
            raise RuntimeError("resize_token_embeddings on a parallelised model: resize before parallelize_model")
        if any(is_adapter_tensor(name) for name, _ in self.named_parameters() if name.startswith(("lm_head", "model.embed_tokens"))):
            raise RuntimeError("resize_token_embeddings with LoRA on the embedding or head: resize before apply_lora")
        std = self.config.initializer_range
        self.model.embed_tokens = resize.resized_embedding(old, size, mean_resizing, std)
        tied = self.model.embed_tokens.weight if self.config.tie_word_embeddings else None
        self.lm_head = resize.resized_head(self.lm_head, size, mean_resizing, std, tied)
        self.config.vocab_size = self.vocab_size = size
        self.tie_weights()
        return self.model.embed_tokens

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' switch (its Trainer and TRL call it): decoder blocks 0, n, 2n, ... recompute in
        backward (``ernie45.distributed.apply_activation_checkpointing``: always non-reentrant, so
        ``use_reentrant`` changes nothing; MoE routing is replayed, not recomputed)."""
        unknown = sorted(set(activation_checkpointing_kwargs or {}) - {"use_reentrant"})
        if unknown:
            raise ValueError(f"activation checkpointing kwargs {unknown} are not supported; only use_reentrant is accepted")
        if offload:
            raise ValueError("offload=True (saved activations in host memory) is not supported; use offload=False")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers={every_n_layers!r} must be a positive integer")
        from ..distributed.activation_checkpoint import set_activation_checkpointing

        set_activation_checkpointing(self, True, every_n_layers)

    def activation_checkpointing_disable(self) -> None:
        from ..distributed.activation_checkpoint import set_activation_checkpointing

        set_activation_checkpointing(self, False)

    @property
    def is_activation_checkpointing(self) -> bool:
        from ..distributed.activation_checkpoint import is_checkpointed

        return is_checkpointed(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers' older name of ``activation_checkpointing_enable`` (PEFT and older scripts call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    gradient_checkpointing_disable = activation_checkpointing_disable
    is_gradient_checkpointing = is_activation_checkpointing

    def add_model_tags(self, tags: str | list[str]) -> None:
        """transformers' model-card tags (TRL's trainers add theirs), kept in ``model_tags``."""
        known = getattr(self, "model_tags", None) or []
        self.model_tags = known + [tag for tag in ([tags] if isinstance(tags, str) else tags) if tag not in known]

    def enable_input_require_grads(self) -> None:
        """transformers' helper (PEFT calls it for frozen embeddings): the embedding output requires grad."""
        self.disable_input_require_grads()  # NOTE: a second call replaces the hook, as transformers' does
        self._input_grad_hook = self.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.requires_grad_(True)
        )

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grad_hook = None
