"""Routed experts for a few rows on CPUs with AVX512-BF16: decoding's expert products at memory speed.

``torch._grouped_mm`` on a CPU makes one matmul call per expert, empty ones included, and each bf16
call re-lays the expert's weight out for oneDNN. Decoding one token sends 6 rows to 6 of 64 experts:
for the mini-MoE's [64,512,1024] gate/up that is 6 calls of ~40 us each plus 60-90 us of calls on the
58 empty experts. ``expert_rows_avx512bf16.cpp`` visits only the experts that have rows, and reads
each of their weight rows once for up to four input rows.

Measured on one MoE projection of 64 experts, bf16, 2-core AVX512-BF16 VM, ``_grouped_mm`` / kernel,
one token: [512,1024] 280 / 57 us with the same six experts every call (their weights in cache),
453 / 160 us with fresh ones; [1024,256] 270 / 43 us and 299 / 122 us; 21B-A3B's [3072,2560]
5.7 / 4.6 ms (1.24x; 20 GB/s of weight, near the VM's memory bandwidth). With more rows per expert
oneDNN's blocked GEMM wins (16 tokens: 0.85-1.03x, 64 tokens: 0.5-0.7x), so the kernel takes at
most ``MAX_ROWS_PER_EXPERT`` rows per expert on average.

The products are fp32 sums of bf16 pairs rounded to bf16 once, as torch's, in another order: the
error against float64 is within 5% of torch's, each result within one bf16 rounding of torch's (tested).
Inference only (no autograd); ``ERNIE45_CPU_EXPERTS=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import build

MAX_ROWS_PER_EXPERT = 0.5  # rows / experts at most (one decoded token sends K rows to E experts)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one log line saying why) where it cannot run here."""
    loaded = build.load("expert_rows_avx512bf16.cpp", "ERNIE45_CPU_EXPERTS", "CPU expert-rows kernel", "torch._grouped_mm")
    if loaded is not None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        loaded.expert_rows_linear.argtypes = [pointer] * 4 + [size] * 4
        loaded.expert_rows_linear.restype = None
    return loaded


def usable(x: torch.Tensor, counts: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``expert_rows_linear`` can take x [N,in] (sorted by expert, ``counts`` [E] per expert)
    through each of ``weights`` [E,out,in'] in turn (the first's in' is x's width), and should:
    inference, bf16 on a CPU, and few rows per expert."""
    tensors = (x, counts, *weights)
    return (
        all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)  # torch.func, vmap
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and all(t.dtype == torch.bfloat16 for t in (x, *weights))
        and counts.dtype == torch.int64
        and x.dim() == 2 and len(weights) > 0 and all(w.dim() == 3 and w.shape[:1] == counts.shape for w in weights)
        and x.shape[1] == weights[0].shape[2]
        and x.shape[0] <= MAX_ROWS_PER_EXPERT * counts.shape[0]
        and not torch.compiler.is_compiling()
        and library() is not None
    )  # fmt: skip


def expert_rows_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """out [N,out]: row n of x [N,in] through its expert's ``weight`` [E,out,in], the rows grouped by
    expert in order, ``counts`` [E] of them each (check ``usable``)."""
    if counts.numel() and (int(counts.min()) < 0 or int(counts.sum()) != x.shape[0]):
        raise ValueError(f"expert row counts {counts.tolist()} do not sum to the {x.shape[0]} rows given")
    out = x.new_empty(x.shape[0], weight.shape[1])
    if x.shape[0] > 0:
        library().expert_rows_linear(
            x.data_ptr(), weight.data_ptr(), counts.data_ptr(), out.data_ptr(), *weight.shape, torch.get_num_threads()
        )
    return out
