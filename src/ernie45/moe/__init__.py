"""Mixture-of-experts building blocks: config, router, grouped experts, token dispatch, balancing."""

from .aux_loss import AuxStats, aux_loss_stats, load_balancing_loss, tokens_per_expert
from .balancing import collect_tokens_per_expert, update_correction_bias
from .config import MoEConfig, is_moe_layer, resolve_moe_config
from .dispatch import LocalDispatcher
from .experts import GroupedExperts, experts_grouped_mm, experts_loop
from .layer import MoELayer, MoERecord, moe_layers
from .router import KeepFloat32, MoEStatics, Router, Routing, fake_balanced_routing, route

__all__ = [
    "AuxStats",
    "GroupedExperts",
    "KeepFloat32",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoERecord",
    "MoEStatics",
    "Router",
    "Routing",
    "aux_loss_stats",
    "collect_tokens_per_expert",
    "experts_grouped_mm",
    "experts_loop",
    "fake_balanced_routing",
    "is_moe_layer",
    "load_balancing_loss",
    "moe_layers",
    "resolve_moe_config",
    "route",
    "tokens_per_expert",
    "update_correction_bias",
]
