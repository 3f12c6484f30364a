"""Where the parallel wrappers find things in an ERNIE 4.5 causal LM (by the AutoModel-compatible names).

``model.model.layers[i]`` are the decoder blocks; a block's ``mlp`` is an MoE layer when it has
routed ``experts`` (and then a ``gate`` router, optional ``shared_experts`` and a swappable
``dispatcher``), otherwise a dense SwiGLU MLP.
"""

from __future__ import annotations

from torch import nn

from ..moe.layer import MoELayer


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def moe_layer(block: nn.Module) -> MoELayer | None:
    """The block's MoE feed-forward, or None for a dense block."""
    mlp = getattr(block, "mlp", None)
    return mlp if isinstance(mlp, MoELayer) else None


def is_tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))
