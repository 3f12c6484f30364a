"""Routed experts as grouped 3-D parameters, with two kernels (``BackendConfig.experts``).

Shapes: N rows sorted by expert, H hidden, I expert intermediate size, E experts held here.

    gate_up_proj [E, 2I, H]  (rows 0..I-1 = gate_proj, I..2I-1 = up_proj; HF's in-memory layout)
    down_proj    [E, H, I]
    expert e on its rows x_e: down_e(silu(gate_e x_e) * up_e x_e)

"torch": a per-expert loop of ``F.linear`` (the readable reference, one host sync for the counts).
"torch_mm": two ``torch._grouped_mm`` calls over all rows with offsets = int32 cumsum of tokens per
expert (no per-expert Python loop). ``_grouped_mm`` needs row strides that are multiples of 16
bytes and, inside ``torch.compile``, bf16 inputs; otherwise this backend falls back to the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mlp import swiglu
from ..sharding import local_part

EXPERT_BACKENDS = ("torch", "torch_mm")


def experts_loop(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: x [N,H] sorted by expert, counts [E] -> [N,H]."""
    outputs, start = [], 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = x[start : start + n]
        gate, up = F.linear(rows, gate_up[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(swiglu(gate, up), down[expert]))
        start += n
    if not outputs:
        return x.new_zeros(0, down.shape[1])
    return torch.cat(outputs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm``'s backward
    rejects expanded/strided gradients such as the one of ``out.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def experts_grouped_mm(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Same result as ``experts_loop`` with ``torch._grouped_mm`` (empty experts are fine)."""
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = _ContiguousGrad.apply(torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs))  # [N,2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(swiglu(gate, up), down.transpose(-2, -1), offs=offs)  # [N,H]
    return _ContiguousGrad.apply(y)


def grouped_mm_usable(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these tensors here (else use the loop)."""
    if x.dtype != gate_up.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # NOTE: torch 2.13's compiled _grouped_mm accepts bf16 only
    size = x.element_size()
    return (gate_up.shape[-1] * size) % 16 == 0 and (down.shape[-1] * size) % 16 == 0


class GroupedExperts(nn.Module):
    """``mlp.experts``: E SwiGLU experts stored as ``gate_up_proj`` [E,2I,H] and ``down_proj`` [E,H,I].

    ``forward(x_sorted [N,H], tokens_per_expert [E_local]) -> [N,H]`` over the experts held here
    (under expert parallelism the first dim is this rank's shard). No bias, as in ERNIE 4.5.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        inter_dim: int,
        backend: str = "torch_mm",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"experts backend {backend!r} is not available; choose one of {EXPERT_BACKENDS}")
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter_dim, dim, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert (uniform +-1/sqrt(fan_in)), so a model built directly
        is usable; ``from_config`` then applies transformers' init (``init_weights``)."""
        for weight in (self.gate_up_proj, self.down_proj):
            bound = weight.shape[-1] ** -0.5
            nn.init.uniform_(weight, -bound, bound)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate_up, down = local_part(self.gate_up_proj), local_part(self.down_proj)
        if tokens_per_expert.shape[0] != gate_up.shape[0]:
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert.shape[0]} entries but this module holds "
                f"{gate_up.shape[0]} experts"
            )
        x = x.to(gate_up.dtype)
        if self.backend == "torch_mm" and grouped_mm_usable(x, gate_up, down):
            return experts_grouped_mm(x, gate_up, down, tokens_per_expert)
        return experts_loop(x, gate_up, down, tokens_per_expert)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"experts={e}, dim={h}, inter_dim={two_i // 2}, backend={self.backend!r}"
