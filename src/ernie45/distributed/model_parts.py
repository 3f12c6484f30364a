"""Where the parallel wrappers find things in an ERNIE 4.5 causal LM (by the seed API's names).

``model.model.layers[i]`` are the decoder blocks; a block's ``mlp`` is an MoE layer when it has
routed ``experts`` (and then a ``gate`` router, optional ``shared_experts`` and a swappable
``dispatcher``), otherwise a dense SwiGLU MLP.
"""

from __future__ import annotations

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def moe_layer(block: nn.Module) -> nn.Module | None:
    """The block's MoE feed-forward, or None for a dense block."""
    mlp = getattr(block, "mlp", None)
    return mlp if hasattr(mlp, "experts") else None


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [mlp for block in decoder_blocks(model) if (mlp := moe_layer(block)) is not None]


def is_tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))
