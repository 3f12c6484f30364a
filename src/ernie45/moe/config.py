"""``MoEConfig``: the mixture-of-experts settings of one model, derived from transformers' config.

Fields and names are NeMo AutoModel's ``MoEConfig``, so its recipes and code carry over; values
an ERNIE 4.5 model cannot use (group-limited routing, a router bias, other activations) are
refused naming the field. ``from_hf_config`` reads an ``Ernie4_5_MoeConfig``; ``moe_overrides``
(a dict) replaces fields by name. Which layers are
MoE layers is part of the checkpoint's architecture and stays in the HF config
(``moe_layer_start_index``/``end_index``/``interval``, see ``is_moe_layer``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch

from ..dtypes import as_dtype

# AutoModel's router rules ERNIE 4.5 can run: "softmax_with_bias" is ERNIE's own (top-k of p + correction
# bias, weights from p); "softmax" is AutoModel's plain softmax router (top-k of p, no bias).
SCORE_FUNCS = ("softmax_with_bias", "softmax")
# AutoModel fields whose only value ERNIE 4.5 can use, and why.
_FIXED = {
    "n_expert_groups": (0, "ERNIE 4.5 routes over all experts, without expert groups"),
    "n_limited_groups": (0, "ERNIE 4.5 routes over all experts, without expert groups"),
    "router_bias": (False, "the ERNIE 4.5 router has no bias (the correction bias is moe_statics')"),
    "expert_bias": (False, "ERNIE 4.5's routed experts have no bias (use_bias adds one to the shared experts only)"),
    "expert_activation": ("swiglu", "ERNIE 4.5's experts are SwiGLU"),
    "shared_expert_activation": ("swiglu", "ERNIE 4.5's shared experts are SwiGLU"),
    "activation_alpha": (1.702, "it only applies to expert_activation='quick_geglu'"),
    "activation_limit": (7.0, "it only applies to expert_activation='quick_geglu'"),
    "softmax_before_topk": (False, "ERNIE 4.5 selects by top-k of softmax + correction bias (score_func)"),
    "shared_expert_gate": (False, "ERNIE 4.5's shared experts are not gated"),
}


@dataclass
class MoEConfig:
    """Routing and expert settings.

    n_routed_experts: E, routed experts per MoE layer. n_shared_experts: shared experts, fused into
        one SwiGLU MLP of width ``moe_inter_dim * n_shared_experts`` (0 = none).
    n_activated_experts: K, experts chosen per token (top-k).
    dim: hidden size H. moe_inter_dim: I, each routed expert's intermediate size.
    score_func: "softmax_with_bias" (ERNIE 4.5, the default: softmax in fp32; selection by
        ``topk(p + correction_bias)``, weights from the unbiased ``p``) or "softmax" (AutoModel's plain
        softmax router: selection by ``topk(p)``, the correction bias unused, weights renormalised to
        sum 1 whatever ``norm_topk_prob`` says). The names and rules are AutoModel's.
    norm_topk_prob: renormalise the K weights to sum 1, dividing by ``max(sum, norm_min)``.
    route_scale: factor on the routing weights after renormalisation (1.0 for ERNIE 4.5).
    aux_loss_coeff: weight of the Switch-style load-balancing loss. When > 0 the model returns the
        (unweighted, HF-compatible) loss as ``output.aux_loss``; a training loop that computes its
        own loss (ernie45's) adds ``aux_loss_coeff * aux_loss`` to it. Derived as transformers applies it:
        ``router_aux_loss_coef`` if ``output_router_logits`` else 0. NOTE: AutoModel's ERNIE model
        uses ``router_aux_loss_coef`` (0.001 in the releases) unconditionally; pass
        ``moe_overrides={"aux_loss_coeff": 0.001}`` (recipe: ``moe.aux_loss_coef``) for its behaviour.
    gate_bias_update_factor: u of the aux-loss-free update ``bias += u * sign(mean(load) - load)``
        (0 = off, the fine-tuning default); see ``ernie45.moe.balancing``.
    shared_expert_bias: bias on the shared-expert projections (HF: ``use_bias``); routed experts
        and the router never have one.
    dtype: dtype of the routed-expert weights at construction (None = the model's dtype). The
        router weight and correction bias are always fp32.
    train_gate: train the router weight (False freezes it). inter_dim: the dense layers'
        intermediate size (informational, as in AutoModel). shared_expert_inter_dim: each shared
        expert's width (None or ``moe_inter_dim``). force_e_score_correction_bias: accepted (the
        correction bias always exists in ERNIE 4.5).
    AutoModel fields with one usable value for ERNIE 4.5 (others are refused): n_expert_groups=0,
    n_limited_groups=0, router_bias=False, expert_bias=False, expert_activation="swiglu",
    shared_expert_activation="swiglu", activation_alpha, activation_limit, softmax_before_topk=False,
    shared_expert_gate=False.
    """

    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    dim: int
    moe_inter_dim: int
    score_func: str = "softmax_with_bias"
    norm_topk_prob: bool = True
    norm_min: float = 1e-12
    route_scale: float = 1.0
    aux_loss_coeff: float = 0.0
    gate_bias_update_factor: float = 0.0
    shared_expert_bias: bool = False
    dtype: torch.dtype | str | None = None
    train_gate: bool = True
    inter_dim: int | None = None
    shared_expert_inter_dim: int | None = None
    force_e_score_correction_bias: bool = True
    n_expert_groups: int = 0
    n_limited_groups: int = 0
    router_bias: bool = False
    expert_bias: bool = False
    expert_activation: str = "swiglu"
    shared_expert_activation: str = "swiglu"
    activation_alpha: float = 1.702
    activation_limit: float = 7.0
    softmax_before_topk: bool = False
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name, (value, why) in _FIXED.items():
            if getattr(self, name) != value:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} is not supported: {why}; use {value!r}")
        if self.shared_expert_inter_dim not in (None, self.moe_inter_dim):
            raise ValueError(
                f"MoEConfig.shared_expert_inter_dim={self.shared_expert_inter_dim} must equal moe_inter_dim="
                f"{self.moe_inter_dim} (ERNIE 4.5's shared experts are as wide as a routed one), or be left unset"
            )
        if self.n_routed_experts < 1:
            raise ValueError(f"MoEConfig.n_routed_experts={self.n_routed_experts} must be >= 1")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            raise ValueError(
                f"MoEConfig.n_activated_experts={self.n_activated_experts} must be between 1 and "
                f"n_routed_experts={self.n_routed_experts}"
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEConfig.score_func={self.score_func!r} is not supported; choose one of {SCORE_FUNCS}")
        if self.aux_loss_coeff < 0 or self.gate_bias_update_factor < 0:
            raise ValueError("MoEConfig.aux_loss_coeff and gate_bias_update_factor must be >= 0")
        self.dtype = as_dtype(self.dtype, "MoEConfig.dtype")

    @property
    def shared_inter_dim(self) -> int:
        return self.moe_inter_dim * self.n_shared_experts

    @classmethod
    def from_hf_config(cls, config) -> "MoEConfig":
        """The settings a transformers ``Ernie4_5_MoeConfig`` describes."""
        return cls(
            n_routed_experts=config.moe_num_experts,
            n_shared_experts=config.moe_num_shared_experts or 0,
            n_activated_experts=config.moe_k,
            dim=config.hidden_size,
            moe_inter_dim=config.moe_intermediate_size,
            norm_min=config.moe_norm_min,
            aux_loss_coeff=float(config.router_aux_loss_coef or 0.0) if config.output_router_logits else 0.0,
            shared_expert_bias=bool(config.use_bias),
            inter_dim=config.intermediate_size,
        )

    def replace(self, overrides: dict) -> "MoEConfig":
        """A copy with ``overrides`` applied; unknown keys raise a ValueError naming the valid ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


def resolve_moe_config(
    config, moe_config: MoEConfig | None = None, moe_overrides: dict | None = None
) -> MoEConfig:
    """``moe_config`` as given, or derived from ``config`` with ``moe_overrides`` applied (not both)."""
    if moe_config is not None and moe_overrides:
        raise ValueError("Cannot pass both moe_config and moe_overrides: apply the overrides to your MoEConfig instead")
    if moe_config is not None:
        if not isinstance(moe_config, MoEConfig):
            raise TypeError(f"moe_config must be an ernie45 MoEConfig, got {type(moe_config).__name__}")
        return moe_config
    derived = MoEConfig.from_hf_config(config)
    return derived.replace(moe_overrides) if moe_overrides else derived


def moe_layer_end(config) -> int:
    end = config.moe_layer_end_index
    return config.num_hidden_layers - 1 if end is None or end == -1 else end


def is_moe_layer(config, layer_idx: int) -> bool:
    """transformers' rule: ``(i+1) % interval == 0 and start <= i <= end`` (end -1 = last layer)."""
    interval = config.moe_layer_interval or 1
    return (layer_idx + 1) % interval == 0 and config.moe_layer_start_index <= layer_idx <= moe_layer_end(config)
