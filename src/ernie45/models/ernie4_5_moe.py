"""Mixture-of-experts ERNIE 4.5 (ERNIE-4.5-21B-A3B, 300B-A47B), configured by ``Ernie4_5_MoeConfig``.

AutoModel-compatible API (the names and signatures of NeMo AutoModel's ``ernie4_5`` MoE module):
``Ernie4_5MoeBlock``, ``Ernie4_5_MoeModel``, ``Ernie4_5_MoeForCausalLM``, ``ModelClass``.
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
import dataclasses
import logging

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from ..checkpoint.state_dict_adapter import Ernie4_5_MoeStateDictAdapter
from ..moe.aux_loss import aux_loss_stats, load_balancing_loss
from ..moe.config import MoEConfig, is_moe_layer, resolve_moe_config
from ..moe.experts import EXPERT_BACKENDS
from ..moe.layer import MoELayer, moe_layers
from .backend import BackendConfig
from .capabilities import ModelCapabilities
from .causal_lm import Ernie4_5CausalLMBase
from .decoder import DecoderModel, Ernie4_5Block, tuple_when_asked
from .mlp import Ernie4_5MLP

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


def build_feed_forward(layer_idx: int, config, moe_config: MoEConfig, backend: BackendConfig) -> nn.Module:
    """Layer ``layer_idx``'s feed-forward: an MoE layer by the schedule, else a dense SwiGLU MLP."""
    if is_moe_layer(config, layer_idx):
        return MoELayer(moe_config, backend, layer_idx=layer_idx)
    return Ernie4_5MLP(config.hidden_size, config.intermediate_size, bool(config.use_bias))


class Ernie4_5MoeBlock(Ernie4_5Block):
    """A decoder block whose feed-forward is an MoE layer or a dense MLP, by the layer schedule."""

    def __init__(self, layer_idx: int, config, moe_config: MoEConfig | None, backend: BackendConfig | None = None):
        backend = backend or BackendConfig()
        moe_config = moe_config or MoEConfig.from_hf_config(config)
        super().__init__(config, backend, mlp=build_feed_forward(layer_idx, config, moe_config, backend))
        self.layer_idx = layer_idx

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)


class Ernie4_5_MoeModel(DecoderModel):
    """Embedding -> MoE/dense blocks -> final norm."""

    def __init__(
        self,
        config,
        backend: BackendConfig | None = None,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ):
        backend = backend or BackendConfig()
        if backend.gate_precision is None:  # NOTE: a copy (as AutoModel): the caller's config is not changed
            backend = dataclasses.replace(backend, gate_precision=torch.float32)
        moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        blocks = [Ernie4_5MoeBlock(i, config, moe_config, backend) for i in range(config.num_hidden_layers)]
        super().__init__(config, backend, blocks)
        self.moe_config = moe_config

    def moe_layers(self) -> list[MoELayer]:
        return list(moe_layers(self).values())

    @tuple_when_asked
    def forward(
        self, input_ids: torch.Tensor | None = None, *, output_router_logits: bool | None = None, **kwargs
    ) -> MoeModelOutputWithPast:
        """The dense body's forward (same keywords); ``output_router_logits`` (default: the config's,
        as transformers) adds each MoE layer's router logits [T,E] fp32 (transformers'
        ``MoeModelOutputWithPast``)."""
        if output_router_logits is None:
            output_router_logits = bool(getattr(self.config, "output_router_logits", False))
        out = super().forward(input_ids, **kwargs)
        router_logits = tuple(layer.last_record.router_logits for layer in self.moe_layers())
        return MoeModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            cache=out.cache,
            hidden_states=out.hidden_states,
            router_logits=router_logits if output_router_logits else None,
        )


class Ernie4_5_MoeForCausalLM(Ernie4_5CausalLMBase):
    """MoE causal LM. ``forward`` returns ``MoeCausalLMOutputWithPast``; ``aux_loss`` (unweighted,
    as transformers computes it, padding excluded) is set when ``output_router_logits`` (the call's,
    else the config's) or ``MoEConfig.aux_loss_coeff > 0``. As in transformers, the ``loss`` of a call
    with labels includes ``config.router_aux_loss_coef * aux_loss`` when ``output_router_logits`` is
    on, so transformers' Trainer trains the same objective; ernie45's trainer computes its own loss
    and adds ``moe_config.aux_loss_coeff * aux_loss``."""

    model_type = "ernie4_5_moe"

    def __init__(
        self,
        config,
        moe_config: MoEConfig | None = None,
        backend: BackendConfig | None = None,
        moe_overrides: dict | None = None,
    ):
        moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        config = config_for(config, moe_config)
        # NOTE: the MoE head has bias=use_bias in transformers (the dense head never has one).
        super().__init__(config, Ernie4_5_MoeModel(config, backend, moe_config=moe_config), bool(config.use_bias))
        self.moe_config = moe_config
        if self.backend.enable_hf_state_dict_adapter:
            self.state_dict_adapter = Ernie4_5_MoeStateDictAdapter(config, moe_config, self.backend, self.dtype)

    def moe_layers(self) -> list[MoELayer]:
        return self.model.moe_layers()

    def causal_lm_output(self, loss, logits, out, output_router_logits: bool | None) -> MoeCausalLMOutputWithPast:
        """``output_router_logits`` (default: the config's, or ``aux_loss_coeff > 0``) also returns
        ``aux_loss`` and the per-MoE-layer ``router_logits`` [T,E] fp32; transformers' rule weighs it
        into ``loss``."""
        asked = bool(self.config.output_router_logits) if output_router_logits is None else bool(output_router_logits)
        collect = asked or (output_router_logits is None and self.moe_config.aux_loss_coeff > 0)
        aux_loss, router_logits = self.router_outputs() if collect else (None, None)
        if asked and loss is not None and aux_loss is not None:
            loss = loss + (self.config.router_aux_loss_coef or 0.0) * aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
            router_logits=router_logits,
        )

    def router_outputs(self) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """(aux_loss, router_logits per MoE layer) of the last forward, from each layer's ``last_record``."""
        records = [layer.last_record for layer in self.moe_layers()]
        if not records or any(r is None or r.router_probs is None for r in records):
            return None, None  # no MoE layer, or the fake balanced gate (no router scores)
        top_k = self.moe_config.n_activated_experts
        stats = [aux_loss_stats(r.router_probs, top_k, r.keep) for r in records]
        aux_loss = load_balancing_loss(stats, self.moe_config.n_routed_experts)
        return aux_loss, tuple(r.router_logits for r in records)

    @classmethod
    def get_capabilities(cls, config) -> ModelCapabilities:
        has_moe = any(is_moe_layer(config, i) for i in range(config.num_hidden_layers))
        return ModelCapabilities(
            is_moe=has_moe, supports_tp=True, supports_cp=True, supports_pp=True, supports_ep=has_moe, supports_fsdp=True,
            supports_activation_checkpointing=True, supports_kv_cache=True, expert_backends=EXPERT_BACKENDS,
        )


ModelClass = Ernie4_5_MoeForCausalLM

__all__ = ["Ernie4_5MoeBlock", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeModel", "ModelClass"]
