"""Causal attention on CPUs with AVX512-BF16: 4.0-4.8x torch's kernel forward, 2.0-2.8x backward.

torch's CPU flash-attention kernel runs its bf16 products at ~90-180 GFLOP/s on such CPUs, a third of
a dense bf16 training step (benchmarks/PROFILE.md). ``causal_attention_avx512bf16.cpp`` does the same
math with one register-tiled ``vdpbf16ps`` micro-kernel: fp32 scores, softmax and sums, probabilities
(and, in backward, score gradients) rounded to bf16 before their products, as torch's kernel does; its
error against float64 is 0.99-1.00x torch's for the output, 0.99-1.03x for grad_q, 0.37-1.0x for grad_k
and grad_v (tests/test_cpu_causal_attention.py). Speed: one layer of the 0.3B (16 heads over 2, head
size 128), 256 / 1,024 / 4,096 tokens, 2-core AVX512-BF16 VM: forward 1.3 / 7.8 / 116 ms against torch's
6.2 / 37.8 / 459, backward 3.9 / 23.8 / 351 against 11.0 / 58.0 / 713 (benchmarks/PROFILE.md, session 39).

It is compiled on first use and called through ctypes (``build.py``). Where it cannot run (another CPU
or dtype, a head size not a multiple of 16, no compiler, tracing), callers use sdpa: ``usable`` says
which. ``ERNIE45_CPU_ATTENTION=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import build


def bind(library: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the two entry points' argument types (pointers, sizes, the scale, strides, threads)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    shape = [size] * 6 + [ctypes.c_float, ctypes.POINTER(ctypes.c_int64), size]
    library.causal_attention_forward.argtypes = [pointer] * 5 + shape
    library.causal_attention_forward.restype = None
    library.causal_attention_backward.argtypes = [pointer] * 9 + shape
    library.causal_attention_backward.restype = None
    return library


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one log line saying why) where it cannot run here."""
    loaded = build.load("causal_attention_avx512bf16.cpp", "ERNIE45_CPU_ATTENTION", "CPU causal attention kernel", "torch's sdpa")
    return bind(loaded) if loaded is not None else None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` can take these q [B,H,Sq,D], k/v [B,Hkv,Sk,D]."""
    tensors = (q, k, v)
    return (
        all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)  # torch.func, vmap
        and all(t.dim() == 4 and t.stride(-1) == 1 for t in tensors)
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.shape[-1] % 16 == 0
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[1] % k.shape[1] == 0
        and 0 < q.shape[2] <= k.shape[2]
        and not torch.compiler.is_compiling()
        and library() is not None
    )


def strides(*tensors: torch.Tensor):
    """Element strides (batch, head, position) of each tensor, flat, as the kernel takes them."""
    flat = [s for t in tensors for s in t.stride()[:3]]
    return (ctypes.c_int64 * len(flat))(*flat)


def pointers(*tensors: torch.Tensor) -> list[ctypes.c_void_p]:
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


class CausalAttention(torch.autograd.Function):
    """out = softmax(scale q k^T, causal) v with native GQA; saves lse [B,H,Sq] fp32 for backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        batch, heads, q_len, dim = q.shape
        out = q.new_empty(batch, q_len, heads, dim).transpose(1, 2)  # [B,H,Sq,D], laid out [B,Sq,H,D]
        lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
        sizes = (batch, heads, k.shape[1], q_len, k.shape[2], dim)
        library().causal_attention_forward(
            *pointers(q, k, v, out, lse), *sizes, scale, strides(q, k, v, out, lse), torch.get_num_threads()
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sizes = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        library().causal_attention_backward(
            *pointers(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v),
            *sizes,
            ctx.scale,
            strides(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v),
            torch.get_num_threads(),
        )
        return grad_q, grad_k, grad_v, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,H,Sq,D], k/v [B,Hkv,Sk,D] -> [B,H,Sq,D]; query i sees keys <= Sk - Sq + i (check ``usable``)."""
    return CausalAttention.apply(q, k, v, scale)
