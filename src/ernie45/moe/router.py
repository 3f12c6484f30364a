"""The ERNIE 4.5 router: fp32 softmax scores, selection by ``topk(p + correction_bias)``.

Shapes: T tokens, H hidden, E routed experts, K experts per token.

    logits = x32 @ W.T                    [T,E] fp32, autocast off (W stored fp32 [E,H])
    p      = softmax(logits)              [T,E]
    idx    = topk(p + bias, K)            [T,K] (bias [1,E] fp32: selection ONLY)
    w      = p.gather(idx)                [T,K] from the unbiased p
    w      = w / max(w.sum(-1), norm_min) (norm_topk_prob) * route_scale, cast to x.dtype

The router weight (``mlp.gate.weight``) and the correction bias
(``mlp.moe_statics.e_score_correction_bias``, a persistent buffer, never trained by the
optimizer) stay fp32 through ``model.to(torch.bfloat16)`` and bf16 builds: see ``KeepFloat32``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class KeepFloat32(nn.Module):
    """A module whose own fp32 tensors keep fp32 when the model is cast (``.to(bf16)``, ``.half()``).

    Only the dtype change is refused; device moves still happen. (Like ``RotaryEmbedding._apply``
    for ``inv_freq``, but these tensors hold trained values, so they must never be rounded at all.)
    """

    def _apply(self, fn, recurse=True):
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)


class MoEStatics(KeepFloat32):
    """Holds ``e_score_correction_bias`` [1,E] fp32 (HF name and shape; a buffer, not a parameter)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.zeros(1, num_experts, dtype=torch.float32))

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.e_score_correction_bias.zero_()


class Routing(NamedTuple):
    logits: torch.Tensor | None  # [T,E] fp32 router logits (None under the fake gate)
    probs: torch.Tensor | None  # [T,E] fp32 softmax of the logits
    topk_idx: torch.Tensor  # [T,K] int64 chosen experts
    topk_weight: torch.Tensor  # [T,K] routing weights, activation dtype


def route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    norm_topk_prob: bool = True,
    norm_min: float = 1e-12,
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits [T,E] -> (probs [T,E], topk_idx [T,K], topk_weight [T,K] fp32)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    scores = probs if correction_bias is None else probs + correction_bias.reshape(-1).to(probs.dtype)
    topk_idx = torch.topk(scores, top_k, dim=-1).indices
    weight = probs.gather(-1, topk_idx)
    if norm_topk_prob:
        weight = weight / torch.clamp(weight.sum(dim=-1, keepdim=True), min=norm_min)
    if route_scale != 1.0:
        weight = weight * route_scale
    return probs, topk_idx, weight


class Router(KeepFloat32):
    """``mlp.gate``: the [E,H] fp32 router weight and the routing math above."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        norm_min: float = 1e-12,
        route_scale: float = 1.0,
        gate_precision: torch.dtype | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim, dtype=torch.float32))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.norm_min = norm_min
        self.route_scale = route_scale
        self.gate_precision = gate_precision or torch.float32  # NOTE: AutoModel's name for the compute dtype

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, correction_bias: torch.Tensor | None) -> Routing:
        """x [T,H] -> Routing; weights come back in x.dtype."""
        # NOTE: autocast would run this matmul in bf16 and change which experts win.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(self.gate_precision), self.weight.to(self.gate_precision))
            probs, topk_idx, weight = route(
                logits.float(), correction_bias, self.top_k, self.norm_topk_prob, self.norm_min, self.route_scale
            )
        return Routing(logits, probs, topk_idx, weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, dim={self.weight.shape[1]}, top_k={self.top_k}"


def fake_balanced_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device,
    noise: float = 0.0,
) -> Routing:
    """Round-robin routing for throughput tests: token t takes experts (t*K + j) % E, weights 1/K.

    With ``noise`` > 0 each token's starting expert is random with that probability (still K
    distinct experts), to mimic imperfect balance. The router weight is not used.
    """
    start = torch.arange(num_tokens, device=device) * top_k
    if noise > 0:
        random_start = torch.randint(0, num_experts, (num_tokens,), device=device)
        start = torch.where(torch.rand(num_tokens, device=device) < noise, random_start, start)
    topk_idx = (start[:, None] + torch.arange(top_k, device=device)) % num_experts
    weight = torch.full((num_tokens, top_k), 1.0 / top_k, dtype=dtype, device=device)
    return Routing(None, None, topk_idx, weight)
