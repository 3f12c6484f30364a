"""Parameter and FLOP accounting from the config alone (so it holds for meta-device and sharded models).

``moe_config`` is None for a dense model; for an MoE model the layers that ``is_moe_layer`` picks
count their routed experts (all E for parameters, K per token for active parameters and FLOPs),
shared experts, router weight and correction bias.
"""

from __future__ import annotations

from typing import NamedTuple

from ..moe.config import MoEConfig, is_moe_layer
from .dimensions import head_dim_of, kv_heads_of


class Counts(NamedTuple):
    params: int  # parameters the layer part holds
    active: int  # parameters one token uses
    matmul: int  # matmul weights one token multiplies by


def attention_counts(config) -> Counts:
    """One attention block (q/k/v/o and their biases)."""
    q_width, kv_width = config.num_attention_heads * head_dim_of(config), kv_heads_of(config) * head_dim_of(config)
    weights = config.hidden_size * (2 * q_width + 2 * kv_width)
    params = weights + (q_width + 2 * kv_width + config.hidden_size if config.use_bias else 0)
    return Counts(params, params, weights)


def feed_forward_counts(config, layer_idx: int, moe_config: MoEConfig | None = None) -> Counts:
    """One layer's MLP, or its MoE layer when ``moe_config`` is given and the layer is an MoE layer."""
    if moe_config is None or not is_moe_layer(config, layer_idx):
        weights = 3 * config.hidden_size * config.intermediate_size
        params = weights + (2 * config.intermediate_size + config.hidden_size if config.use_bias else 0)
        return Counts(params, params, weights)
    m = moe_config
    expert = 3 * m.dim * m.moe_inter_dim
    shared_weights = 3 * m.dim * m.shared_inter_dim
    shared_biases = 2 * m.shared_inter_dim + m.dim if m.shared_expert_bias and m.n_shared_experts else 0
    router = m.n_routed_experts * m.dim + m.n_routed_experts  # weight + correction bias
    always = shared_weights + shared_biases + router
    return Counts(
        m.n_routed_experts * expert + always,
        m.n_activated_experts * expert + always,
        m.n_activated_experts * expert + shared_weights + m.n_routed_experts * m.dim,
    )


def num_parameters(config, moe_config: MoEConfig | None = None, active_only: bool = False, head_bias: bool = False) -> int:
    """As transformers' ``num_parameters()`` counts (tied head once; the MoE correction bias included).
    ``active_only``: those one token uses (K of E routed experts)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    total = vocab * hidden + hidden  # embedding, final norm
    if not config.tie_word_embeddings:
        total += vocab * hidden + (vocab if head_bias else 0)
    attention = attention_counts(config).params
    for i in range(config.num_hidden_layers):
        ff = feed_forward_counts(config, i, moe_config)
        total += attention + 2 * hidden + (ff.active if active_only else ff.params)
    return total


def flops_per_token(config, seq_len: int, moe_config: MoEConfig | None = None) -> int:
    """Training FLOPs (forward + backward) per token: ``6 * matmul weights used per token +
    12 * layers * heads * head_dim * seq_len`` (PaLM/torchtitan convention: attention counted
    as non-causal; the embedding lookup is free, the LM head matmul is counted even if tied)."""
    matmul = config.vocab_size * config.hidden_size
    attention = attention_counts(config).matmul
    for i in range(config.num_hidden_layers):
        matmul += attention + feed_forward_counts(config, i, moe_config).matmul
    return 6 * matmul + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim_of(config) * seq_len
