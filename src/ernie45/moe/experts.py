"""Routed experts as grouped 3-D parameters, with two kernels (``BackendConfig.experts``).

Shapes: N rows sorted by expert, H hidden, I expert intermediate size, E experts held here.

    gate_up_proj [E, 2I, H]  (rows 0..I-1 = gate_proj, I..2I-1 = up_proj; HF's in-memory layout)
    down_proj    [E, H, I]
    expert e on its rows x_e: down_e(silu(gate_e x_e) * up_e x_e)

"torch": a per-expert loop of ``F.linear`` (the readable reference, one host sync for the counts).
"torch_mm": two ``torch._grouped_mm`` calls over all rows with offsets = int32 cumsum of tokens per
expert (no per-expert Python loop). ``_grouped_mm`` needs row strides that are multiples of 16
bytes and, inside ``torch.compile``, bf16 inputs; otherwise this backend falls back to the loop.
Under either, inference on a few bf16 rows (decode steps) on a CPU with AVX512-BF16 goes to
``ernie45/kernels/expert_rows.py``, which skips the empty experts that ``_grouped_mm`` visits.

LoRA (``add_lora``, used by ``ernie45.peft``): per expert e and projection W_e [out,in] a rank-r
pair A_e [r,in], B_e [out,r] held as grouped tensors ``{proj}_lora_A`` [E,r,in] and
``{proj}_lora_B`` [E,out,r]; each projection becomes ``x W_e^T + scale * (x A_e^T) B_e^T``. Both
kernels apply it on the rows (two more grouped matmuls of width r per projection under
"torch_mm"), never forming the [E,out,in] update; on a CPU those products run in fp32
(``lora_compute_dtype``). The frozen base weights keep their names.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import expert_rows
from ..models.mlp import swiglu, swiglu_backward
from ..sharding import local_part

EXPERT_BACKENDS = ("torch", "torch_mm")
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")  # NOTE: registration order, which PEFT's nesting follows


class ExpertLoRA(NamedTuple):
    """One projection's per-expert adapter, as this rank computes with it."""

    a: torch.Tensor  # [E,r,in]
    b: torch.Tensor  # [E,out,r]
    scale: float


def lora_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the expert adapters' products for inputs ``x``: fp32 on a CPU, else x's.

    NOTE: on a CPU a bf16 product goes to oneDNN, which builds a kernel for every new row count;
    routing gives each expert a new row count on every call, so the thin rank-r products spent
    most of their time building kernels (x A^T over 64 experts with fresh counts: 19 ms in bf16,
    4.3 ms in fp32 through MKL with the cast of x included; low B^T: 14.6 vs 1.7 ms). The adapters
    are usually fp32 anyway; the update is cast to x's dtype when added.
    """
    return torch.float32 if x.device.type == "cpu" else x.dtype


def expert_linear(rows: torch.Tensor, weight: torch.Tensor, lora: ExpertLoRA | None, expert: int) -> torch.Tensor:
    """rows [n,in] through expert ``expert``'s projection ``weight`` [E,out,in] (+ its adapter,
    computed in the adapter's dtype)."""
    out = F.linear(rows, weight[expert])
    if lora is None:
        return out
    low = F.linear(rows.to(lora.a.dtype), lora.a[expert]) * lora.scale
    return out + F.linear(low, lora.b[expert]).to(out.dtype)


def experts_loop(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: torch.Tensor,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """Reference: x [N,H] sorted by expert, counts [E] -> [N,H]."""
    outputs, start = [], 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = x[start : start + n]
        gate, up = expert_linear(rows, gate_up, gate_up_lora, expert).chunk(2, dim=-1)
        outputs.append(expert_linear(swiglu(gate, up), down, down_lora, expert))
        start += n
    if not outputs:
        return x.new_zeros(0, down.shape[1])
    return torch.cat(outputs)


def _with_contiguous_grad(out: torch.Tensor) -> torch.Tensor:
    """``out`` whose gradient reaches its backward contiguous (``_grouped_mm``'s backward rejects
    expanded/strided gradients such as the one of ``out.sum()``).

    NOTE: a gradient hook, not an identity autograd Function: a Function's output is a view, and
    FSDP2 warns on every module that returns one (an in-place op on it would skip the all-gather).
    """
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


def _aligned_rank(lora: ExpertLoRA) -> ExpertLoRA:
    """The adapter with its rank zero-padded to a multiple of 16 bytes (``_grouped_mm``'s stride rule
    for the [N,r] rows and the transposed B); zeros add nothing and get zero gradients."""
    rank = lora.a.shape[1]
    pad = -rank % max(1, 16 // lora.a.element_size())
    if pad == 0:
        return lora
    return ExpertLoRA(F.pad(lora.a, (0, 0, 0, pad)), F.pad(lora.b, (0, pad)), lora.scale)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, lora: ExpertLoRA | None) -> torch.Tensor:
    """x [N,in] sorted by expert through ``weight`` [E,out,in] (+ adapter, in its dtype): [N,out],
    grouped matmuls only."""
    out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    if lora is None:
        return _with_contiguous_grad(out)
    lora = _aligned_rank(lora)
    low = torch._grouped_mm(x.to(lora.a.dtype), lora.a.transpose(-2, -1), offs=offs) * lora.scale  # [N,r]
    update = torch._grouped_mm(low, lora.b.transpose(-2, -1), offs=offs)  # [N,out]
    return _with_contiguous_grad(out + update.to(out.dtype))


class _GroupedSwiGLUDown(torch.autograd.Function):
    """``_grouped_mm(silu(gate) * up, down^T)`` keeping the [N,2I] gate/up rows and the down weight
    for backward, not the [N,I] SwiGLU output: backward makes it again (one elementwise pass).

    NOTE: the products and the SwiGLU gradient are the kernels autograd calls for the unfused path
    (``grouped_linear`` after ``swiglu``), so the bits are the same (tested).
    """

    @staticmethod
    def forward(ctx, gate_up, down, offs):  # gate_up [N,2I] (gate | up), down [E,H,I], offs [E] int32
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, down, offs)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)  # [N,H]

    @staticmethod
    def backward(ctx, grad):  # grad [N,H]
        gate_up, down, offs = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = grad.contiguous()  # NOTE: _grouped_mm rejects expanded gradients (see _with_contiguous_grad)
        silu_gate = F.silu(gate)
        grad_down = None
        if ctx.needs_input_grad[1]:
            grad_down = torch._grouped_mm(grad.t(), silu_gate * up, offs=offs)  # [E,H,I]
        grad_gate_up = None
        if ctx.needs_input_grad[0]:
            grad_act = torch._grouped_mm(grad, down, offs=offs)  # [N,I]
            grad_gate_up = torch.cat(swiglu_backward(grad_act, gate, up, silu_gate), dim=-1)
        return grad_gate_up, grad_down, None


def experts_grouped_mm(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: torch.Tensor,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """Same result as ``experts_loop`` with ``torch._grouped_mm`` (empty experts are fine).
    Without an adapter on ``down`` the SwiGLU output is made again in backward, not kept."""
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up_rows = grouped_linear(x, gate_up, offs, gate_up_lora)  # [N,2I]
    if down_lora is None:
        return _GroupedSwiGLUDown.apply(gate_up_rows, down, offs)
    gate, up = gate_up_rows.chunk(2, dim=-1)  # [N,I] each
    return grouped_linear(swiglu(gate, up), down, offs, down_lora)  # [N,H]


def grouped_mm_usable(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these tensors here (else use the loop)."""
    if x.dtype != gate_up.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # NOTE: torch 2.13's compiled _grouped_mm accepts bf16 only
    size = x.element_size()
    return (gate_up.shape[-1] * size) % 16 == 0 and (down.shape[-1] * size) % 16 == 0


def few_rows_usable(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether ``experts_few_rows`` takes these: inference on a few bf16 rows on an AVX512-BF16 CPU."""
    return 2 * down.shape[-1] == gate_up.shape[1] and expert_rows.usable(x, counts, gate_up, down)


def experts_few_rows(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``experts_grouped_mm`` for inference on a few rows (decoding), through the expert-rows kernel,
    which skips empty experts (``ernie45/kernels/expert_rows.py``)."""
    gate, up = expert_rows.expert_rows_linear(x, gate_up, counts).chunk(2, dim=-1)  # [N,I] each
    return expert_rows.expert_rows_linear(F.silu(gate) * up, down, counts)  # [N,H]


class GroupedExperts(nn.Module):
    """``mlp.experts``: E SwiGLU experts stored as ``gate_up_proj`` [E,2I,H] and ``down_proj`` [E,H,I].

    ``forward(x_sorted [N,H], tokens_per_expert [E_local]) -> [N,H]`` over the experts held here
    (under expert parallelism the first dim is this rank's shard, adapters included). No bias, as
    in ERNIE 4.5.
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
        self.lora_scales: dict[str, float] = {}  # projection -> scale, for those with an adapter
        self.lora_enabled = True  # False inside ernie45.peft.adapters_disabled: the base experts alone
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

    def add_lora(self, projection: str, rank: int, scale: float, dtype: torch.dtype | None = None) -> None:
        """Give ``projection`` (gate_up_proj or down_proj) a per-expert rank-``rank`` adapter:
        ``{projection}_lora_A`` [E,r,in] and ``{projection}_lora_B`` [E,out,r], uninitialised (the
        caller fills them: ``ernie45.peft`` draws A and zeroes B), on the base weight's device."""
        if projection not in EXPERT_PROJECTIONS:
            raise ValueError(f"no expert projection {projection!r}; choose one of {EXPERT_PROJECTIONS}")
        if projection in self.lora_scales:
            raise ValueError(f"{projection} already has a LoRA adapter")
        weight = self.get_parameter(projection)
        experts, out_dim, in_dim = weight.shape
        like = dict(dtype=dtype or weight.dtype, device=weight.device)
        self.register_parameter(f"{projection}_lora_A", nn.Parameter(torch.empty(experts, rank, in_dim, **like)))
        self.register_parameter(f"{projection}_lora_B", nn.Parameter(torch.empty(experts, out_dim, rank, **like)))
        self.lora_scales[projection] = scale

    def remove_lora(self, projection: str) -> None:
        """Drop ``projection``'s adapter (after ``ernie45.peft.merge`` folded it into the weight)."""
        del self.lora_scales[projection]
        del self._parameters[f"{projection}_lora_A"], self._parameters[f"{projection}_lora_B"]

    def _local_lora(self, projection: str, dtype: torch.dtype) -> ExpertLoRA | None:
        if projection not in self.lora_scales or not self.lora_enabled:
            return None
        a = local_part(self.get_parameter(f"{projection}_lora_A")).to(dtype)
        b = local_part(self.get_parameter(f"{projection}_lora_B")).to(dtype)
        return ExpertLoRA(a, b, self.lora_scales[projection])

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate_up, down = local_part(self.gate_up_proj), local_part(self.down_proj)
        if tokens_per_expert.shape[0] != gate_up.shape[0]:
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert.shape[0]} entries but this module holds "
                f"{gate_up.shape[0]} experts"
            )
        # NOTE: autocast does not cover torch._grouped_mm, so under mixed precision the experts run
        # in their weights' dtype (fp32). Casting them to bf16 here was tried on CPU: the expert
        # matmuls took 1.0 s instead of 1.9 s per mini-MoE step, but casting [E,2I,H] weights and
        # their gradients every step cost more (whole step 200 -> 170 tokens/s, +0.7 GiB peak).
        # Casting expert by expert (1 MB pieces, re-cast in backward, bf16 products) halved the
        # experts' time alone (262 -> 148 ms per layer) but not in the step (211 -> 208 tokens/s,
        # +0.5 GiB): there every memory-bound piece ran ~2x slower than alone.
        x = x.to(gate_up.dtype)
        lora_dtype = lora_compute_dtype(x)
        loras = self._local_lora("gate_up_proj", lora_dtype), self._local_lora("down_proj", lora_dtype)
        if all(lora is None for lora in loras) and few_rows_usable(x, gate_up, down, tokens_per_expert):
            return experts_few_rows(x, gate_up, down, tokens_per_expert)
        if self.backend == "torch_mm" and grouped_mm_usable(x, gate_up, down):
            return experts_grouped_mm(x, gate_up, down, tokens_per_expert, *loras)
        return experts_loop(x, gate_up, down, tokens_per_expert, *loras)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        lora = "".join(
            f", {name}_lora_rank={self.get_parameter(name + '_lora_A').shape[1]}" for name in self.lora_scales
        )
        return f"experts={e}, dim={h}, inter_dim={two_i // 2}, backend={self.backend!r}{lora}"
