"""One ERNIE 4.5 mixture-of-experts feed-forward (``model.layers.{i}.mlp`` of MoE layers).

Shapes: B batch, S sequence, T = B*S tokens, H hidden, E routed experts, K experts per token.

    x [B,S,H] -> [T,H]
    routing  = gate(x, moe_statics.e_score_correction_bias)       (router.py, fp32; no bias: score_func "softmax")
    x_sorted, counts, state = dispatcher.dispatch(x, idx, w, keep) (dispatch.py; keep = not padding)
    routed   = dispatcher.combine(experts(x_sorted, counts), state) (experts.py)
    out      = routed + shared_experts(x)                         (one SwiGLU of width I*n_shared)

Submodule names are the HF checkpoint names: ``gate.weight`` [E,H] fp32,
``moe_statics.e_score_correction_bias`` [1,E] fp32 (buffer), ``experts.gate_up_proj`` [E,2I,H],
``experts.down_proj`` [E,H,I], ``shared_experts.{gate,up,down}_proj``.

What the last forward routed is held in ONE place, ``layer.last_record`` (a ``MoERecord``,
replaced whole by each forward): expert loads for metrics and aux-loss-free balancing, and the
router's logits and probabilities from which the causal LM builds ``aux_loss`` / ``router_logits``
when asked. NOTE: the record keeps two [T,E] fp32 tensors per MoE layer alive until the next
forward (with their autograd graph when gradients were tracked and no backward has run yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.backend import BackendConfig
from ..models.mlp import Ernie4_5MLP
from .aux_loss import tokens_per_expert
from .config import MoEConfig
from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .router import MoEStatics, Router, fake_balanced_routing


@dataclass(frozen=True)
class MoERecord:
    """What one MoE layer's forward routed (T tokens of that forward, E routed experts)."""

    tokens_per_expert: torch.Tensor  # [E] int64, padding excluded, the actual (biased) selection
    router_logits: torch.Tensor | None  # [T,E] fp32 (None under the fake balanced gate)
    router_probs: torch.Tensor | None  # [T,E] fp32 softmax, with grad: the aux loss's input
    keep: torch.Tensor | None  # [T] bool, False = padding (None: no padding)


class MoELayer(nn.Module):
    def __init__(self, moe_config: MoEConfig, backend: BackendConfig | None = None, layer_idx: int = 0):
        super().__init__()
        backend = backend or BackendConfig()
        self.moe_config = moe_config
        self.layer_idx = layer_idx
        self.num_experts = moe_config.n_routed_experts
        self.top_k = moe_config.n_activated_experts
        self.fake_balanced_gate = backend.fake_balanced_gate
        self.fake_gate_noise = backend.fake_gate_noise
        self.gate = Router(
            moe_config.dim,
            moe_config.n_routed_experts,
            moe_config.n_activated_experts,
            norm_topk_prob=moe_config.norm_topk_prob or moe_config.score_func == "softmax",
            norm_min=moe_config.norm_min,
            route_scale=moe_config.route_scale,
            gate_precision=backend.gate_precision,
        )
        self.gate.weight.requires_grad_(moe_config.train_gate)
        self.moe_statics = MoEStatics(moe_config.n_routed_experts)
        self.experts = GroupedExperts(
            moe_config.n_routed_experts, moe_config.dim, moe_config.moe_inter_dim, backend.experts, moe_config.dtype
        )
        self.shared_experts = (
            Ernie4_5MLP(moe_config.dim, moe_config.shared_inter_dim, moe_config.shared_expert_bias)
            if moe_config.n_shared_experts > 0
            else None
        )
        # NOTE: a plain object, not a submodule: expert parallelism swaps it from outside.
        self.dispatcher = LocalDispatcher(moe_config.n_routed_experts)
        self.last_record: MoERecord | None = None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H]; padding_mask [...] bool (True = padding) or None."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T,H]
        keep = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
        if self.fake_balanced_gate:
            routing = fake_balanced_routing(
                x.shape[0], self.num_experts, self.top_k, x.dtype, x.device, self.fake_gate_noise
            )
        else:
            selects_with_bias = self.moe_config.score_func == "softmax_with_bias"
            routing = self.gate(x, self.moe_statics.e_score_correction_bias if selects_with_bias else None)
        self.last_record = MoERecord(
            tokens_per_expert(routing.topk_idx, keep, self.num_experts), routing.logits, routing.probs, keep
        )

        x_sorted, counts, state = self.dispatcher.dispatch(x, routing.topk_idx, routing.topk_weight, keep)
        out = self.dispatcher.combine(self.experts(x_sorted, counts), state)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, dispatcher={self.dispatcher!r}"


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """{layer index: MoE layer} of a model, in layer order (any wrapper around it)."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, MoELayer)}
