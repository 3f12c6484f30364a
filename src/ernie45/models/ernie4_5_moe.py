"""Mixture-of-experts ERNIE 4.5 (ERNIE-4.5-21B-A3B, 300B-A47B), configured by ``Ernie4_5_MoeConfig``.

Seed API: ``Ernie4_5MoeBlock``, ``Ernie4_5_MoeModel``, ``Ernie4_5_MoeForCausalLM``, ``ModelClass``.
The same decoder as the dense model (decoder.py); only the feed-forward of MoE layers changes:

  * layer i is MoE iff ``(i+1) % moe_layer_interval == 0 and start <= i <= end`` (moe/config.py),
    the others keep a dense SwiGLU MLP of ``intermediate_size``;
  * MoE feed-forward = fp32 softmax router with correction bias (selection only) + K of E routed
    SwiGLU experts (grouped 3-D weights) + one shared SwiGLU of width ``moe_intermediate_size *
    moe_num_shared_experts`` (moe/layer.py); padding tokens skip the routed experts;
  * the LM head has a bias iff ``use_bias`` (unlike the dense model's).
Settings beyond the HF config come from ``MoEConfig`` (``moe_config=`` or ``moe_overrides=``).
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ..moe.balancing import load_balancing_loss
from ..moe.config import MoEConfig, is_moe_layer, resolve_moe_config
from ..moe.experts import EXPERT_BACKENDS
from ..moe.layer import MoELayer
from .backend import BackendConfig
from .capabilities import ModelCapabilities
from .causal_lm import Ernie4_5CausalLMBase
from .decoder import DecoderModel, Ernie4_5Block

logger = logging.getLogger(__name__)

# MoEConfig field -> the config.json field that stores it, so a saved model describes itself.
_HF_FIELDS = {
    "n_routed_experts": "moe_num_experts",
    "n_activated_experts": "moe_k",
    "n_shared_experts": "moe_num_shared_experts",
    "moe_inter_dim": "moe_intermediate_size",
    "norm_min": "moe_norm_min",
}


def config_for(config, moe_config: MoEConfig):
    """``config``, or a copy updated with the architecture fields ``moe_config`` overrides."""
    if moe_config.dim != config.hidden_size:
        raise ValueError(f"MoEConfig.dim={moe_config.dim} must equal the config's hidden_size={config.hidden_size}")
    changed = {
        hf: getattr(moe_config, ours)
        for ours, hf in _HF_FIELDS.items()
        if getattr(moe_config, ours) != getattr(config, hf)
    }
    defaults = MoEConfig.from_hf_config(config)
    unsaved = [
        name
        for name in ("score_func", "norm_topk_prob", "route_scale")
        if getattr(moe_config, name) != getattr(defaults, name)
    ]
    if unsaved:
        logger.warning("MoEConfig %s differ from ERNIE 4.5's and cannot be stored in config.json", unsaved)
    if not changed:
        return config
    config = copy.deepcopy(config)
    for name, value in changed.items():
        setattr(config, name, value)
    return config


class Ernie4_5MoeBlock(Ernie4_5Block):
    """A decoder block whose feed-forward is an MoE layer or a dense MLP, by the layer schedule."""

    def __init__(self, layer_idx: int, config, moe_config: MoEConfig | None, backend: BackendConfig | None = None):
        # NOTE: build_mlp (called by the parent constructor) needs these two.
        self.layer_idx = layer_idx
        self.moe_config = moe_config or MoEConfig.from_hf_config(config)
        super().__init__(config, backend or BackendConfig())

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def build_mlp(self, config, backend: BackendConfig):
        if is_moe_layer(config, self.layer_idx):
            return MoELayer(self.moe_config, backend, layer_idx=self.layer_idx)
        return super().build_mlp(config, backend)

    def feed_forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(h, padding_mask) if self.is_moe else self.mlp(h)


class Ernie4_5_MoeModel(DecoderModel):
    """Embedding -> MoE/dense blocks -> final norm."""

    def __init__(
        self,
        config,
        backend: BackendConfig | None = None,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ):
        self.moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        super().__init__(config, backend)

    def build_block(self, layer_idx: int) -> Ernie4_5MoeBlock:
        return Ernie4_5MoeBlock(layer_idx, self.config, self.moe_config, self.backend)

    def moe_layers(self) -> list[MoELayer]:
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoELayer)]


class Ernie4_5_MoeForCausalLM(Ernie4_5CausalLMBase):
    """MoE causal LM. ``forward`` returns ``MoeCausalLMOutputWithPast``; ``aux_loss`` (unweighted,
    as transformers computes it, padding excluded) is set when ``MoEConfig.aux_loss_coeff > 0`` or
    ``output_router_logits=True``, and is never added to ``loss``: add
    ``moe_config.aux_loss_coeff * aux_loss`` yourself."""

    model_type = "ernie4_5_moe"
    lm_head_bias = True  # transformers' MoE head has bias=use_bias

    def __init__(self, config, moe_config: MoEConfig | None = None, backend: BackendConfig | None = None, **kwargs):
        moe_overrides = kwargs.pop("moe_overrides", None)
        if kwargs:
            raise TypeError(f"Ernie4_5_MoeForCausalLM got unexpected arguments: {sorted(kwargs)}")
        self.moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        self._collect_aux = False
        super().__init__(config_for(config, self.moe_config), backend)

    def build_model(self) -> Ernie4_5_MoeModel:
        return Ernie4_5_MoeModel(self.config, self.backend, moe_config=self.moe_config)

    def moe_layers(self) -> list[MoELayer]:
        return self.model.moe_layers()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **attn_kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """As the dense forward; ``output_router_logits`` (default: ``aux_loss_coeff > 0``) also
        returns ``aux_loss`` and the per-MoE-layer ``router_logits`` [T,E] fp32."""
        collect = self.moe_config.aux_loss_coeff > 0 if output_router_logits is None else bool(output_router_logits)
        self._collect_aux = collect
        for layer in self.moe_layers():
            layer.collect_aux = collect
        return super().forward(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            labels=labels,
            **attn_kwargs,
        )

    def make_output(self, **fields) -> MoeCausalLMOutputWithPast:
        aux_loss = router_logits = None
        if self._collect_aux:
            layers = self.moe_layers()
            stats = [layer.last_aux_stats for layer in layers if layer.last_aux_stats is not None]
            if stats:
                aux_loss = load_balancing_loss(stats, self.moe_config.n_routed_experts)
                router_logits = tuple(layer.last_router_logits for layer in layers)
            for layer in layers:  # NOTE: do not keep the autograd graph alive until the next step
                layer.last_aux_stats = layer.last_router_logits = None
        return MoeCausalLMOutputWithPast(aux_loss=aux_loss, router_logits=router_logits, **fields)

    # ----- accounting -------------------------------------------------------------------------
    def _feed_forward_counts(self, layer_idx: int) -> tuple[int, int, int]:
        if not is_moe_layer(self.config, layer_idx):
            return super()._feed_forward_counts(layer_idx)
        m = self.moe_config
        expert = 3 * m.dim * m.moe_inter_dim
        shared_weights = 3 * m.dim * m.shared_inter_dim
        shared_biases = 2 * m.shared_inter_dim + m.dim if m.shared_expert_bias and m.n_shared_experts else 0
        router = m.n_routed_experts * m.dim + m.n_routed_experts  # weight + correction bias
        always = shared_weights + shared_biases + router
        return (
            m.n_routed_experts * expert + always,
            m.n_activated_experts * expert + always,
            m.n_activated_experts * expert + shared_weights + m.n_routed_experts * m.dim,
        )

    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        has_moe = any(is_moe_layer(config, i) for i in range(config.num_hidden_layers))
        return ModelCapabilities(
            is_moe=has_moe, supports_tp=True, supports_ep=has_moe, supports_fsdp=True,
            supports_activation_checkpointing=True, supports_kv_cache=True, expert_backends=EXPERT_BACKENDS,
        )


ModelClass = Ernie4_5_MoeForCausalLM

__all__ = ["Ernie4_5MoeBlock", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeModel", "ModelClass"]
