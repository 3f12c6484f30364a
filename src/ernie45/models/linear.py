"""The model's linear layer: ``nn.Linear``, plus oneDNN-prepacked weights for CPU bf16 inference,
and no low-precision weight copies kept for backward under autocast.

Mixed-precision training (fp32 weights, bf16 autocast) casts each weight to bf16 for its product,
and autograd keeps that copy until backward: half the size of the weights, alive at the loss (for
the 0.3B 0.47 GiB of the 6.2 GiB its step held there). ``Linear`` keeps the fp32 weight it holds
anyway and casts it again in backward (a memory-bound pass: ~0.05 s for the 0.3B's linear weights,
under 1% of its CPU step). Layers that read
one fp32 input (q/k/v after the norm) share its one bf16 cast, where autocast makes and keeps one
each. The products are the same calls on the same numbers, so outputs and gradients are bitwise
those of ``F.linear`` under autocast (tested).

On a CPU, ``F.linear`` in bf16 re-lays the weight out for oneDNN on every call: for one token
(decode) that costs as much as the product itself (a [103424, 1024] head: 13 ms plain, 6.5 ms
prepacked; a [3072, 1024] projection 3x). So inside a ``prepacked_weights(model)`` block
(``generate``, chat and the HellaSwag evaluation open one) inference calls (eval mode, no
autograd needed, bf16 weights, contiguous bf16 input) multiply by a copy of the weight in
oneDNN's own layout. The product is the same oneDNN kernel on the same numbers: the result is
bitwise equal to ``F.linear`` (tested).

In fp32 there is nothing to pack, but the call itself is slow for a few rows: ``F.linear`` goes to
MKL, whose product of one row (decode) or a few (batched decode) runs at ~13 GiB/s of weight on
a 2-core AVX2 VM (no native bf16), where oneDNN, given the plain weight, reaches ~23 GiB/s
(1.2-2.9x faster at 1-32 rows; at 64 rows and more level or slower). So inside a block
an fp32 inference call of at most ``FP32_ONEDNN_MAX_ROWS`` rows goes to oneDNN with the layer's own
weight: no copy, nothing to go stale. The sum runs in another order than MKL's, so results differ
from ``F.linear`` within fp32 rounding (tested at rtol 1e-5), not bitwise.

The bf16 copy is made on first use inside a block and freed when the outermost block ends (making it
costs ~0.4 s for the 0.3B, so a serving loop keeps one block open around many ``generate`` calls).
Inside a block it is checked against the weight's storage and version on every call; writes
through ``.data`` (PEFT's merge, EMA updates) leave the version unchanged, so weights must not be
changed that way inside a block; between blocks anything goes. ``train()`` and ``.to()`` drop it.
The price is one extra copy of the linear weights (bf16) while a block is open;
``BackendConfig(prepack_cpu_inference=False)`` (or ``set_prepacking(model, False)``) turns both
routes off.
FSDP turns it off: its weights are gathered per forward, and a packed copy would keep the whole
gathered weight on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


FP32_ONEDNN_MAX_ROWS = 32  # fp32 inference rows sent to oneDNN inside a block (see the module docstring)


@functools.cache
def onednn_available() -> bool:
    """oneDNN is built into this torch (the fp32 route)."""
    return torch.backends.mkldnn.is_available()


@functools.cache
def prepacking_available() -> bool:
    """oneDNN is built in and this CPU multiplies bf16 with it (the bf16 prepacked route)."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def set_prepacking(model: nn.Module, enabled: bool) -> None:
    """Turn the oneDNN inference routes (bf16 prepacked, fp32 few-row) of every ``Linear`` in
    ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.prepack = enabled and onednn_available()
            module._packed = None


@contextlib.contextmanager
def prepacked_weights(model: nn.Module) -> Iterator[None]:
    """Inference inside this block uses prepacked weights, freed when the outermost block ends
    (see the module docstring). Weights must not be changed through ``.data`` inside it."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.prepack]
    for layer in layers:
        layer._blocks += 1
    try:
        yield
    finally:
        for layer in layers:
            layer._blocks -= 1
            if layer._blocks == 0:
                layer._packed = None


def autocast_cast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``weight`` to for a product, if it casts it here at all."""
    device = weight.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype == torch.float32 and dtype != torch.float32 else None


_last_input_cast: tuple = (None, -1, None)  # (weakref to an input, its version, weakref to its cast)


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``; the very tensor the previous call made when that call cast this same,
    unchanged ``x``. Layers reading one input (q/k/v, gate/up) then keep one low-precision copy of it
    for backward, not one each as autocast does (a dense-0.3b step: 108 MiB less saved)."""
    global _last_input_cast
    source, version, cast = _last_input_cast
    shared = cast() if source is not None and source() is x and version == x._version else None
    if shared is not None and shared.dtype == dtype:
        return shared
    x_low = x.to(dtype)
    if x_low is not x:
        _last_input_cast = (weakref.ref(x), x._version, weakref.ref(x_low))
    return x_low


def cast_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``F.linear`` of x, weight and bias cast to ``dtype`` with autocast off, the input as multiplied):
    the product autocast makes. ``dtype`` None: as they are (no autocast cast applies)."""
    if dtype is None:
        return F.linear(x, weight, bias), x
    with torch.autocast(weight.device.type, enabled=False):
        x_low = _cast_input(x, dtype)
        return F.linear(x_low, weight.to(dtype), bias.to(dtype) if bias is not None else None), x_low


def linear_backward(
    grad: torch.Tensor, x_low: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None,
    x_dtype: torch.dtype, needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad x, grad weight, grad bias) of ``cast_linear`` for those ``needs_grad`` asks, the weight
    cast again to ``dtype``.

    NOTE: autograd's own calls for a linear on a 2-D view (``mm`` and its backward formulas: the
    weight gradient as ``grad.T @ x``), so the bits are those of ``F.linear``.
    """
    grad_2d = grad.reshape(-1, grad.shape[-1])  # [rows, out]
    grad_x = grad_weight = grad_bias = None
    if needs_grad[0]:
        weight_low = weight.to(dtype) if dtype is not None else weight
        grad_x = grad_2d.mm(weight_low).view(*grad.shape[:-1], weight.shape[1]).to(x_dtype)
    if needs_grad[1]:
        grad_weight = grad_2d.t().mm(x_low.reshape(-1, x_low.shape[-1])).to(weight.dtype)
    if needs_grad[2]:
        grad_bias = grad_2d.sum(0).to(weight.dtype)
    return grad_x, grad_weight, grad_bias


class _RecastLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` as autocast computes it (all three cast to ``dtype``), saving the
    fp32 ``weight`` instead of its cast: backward casts it again (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):  # x [..., in], weight [out, in]
        out, x_low = cast_linear(x, weight, bias, dtype)
        ctx.save_for_backward(x_low, weight)
        ctx.dtype, ctx.x_dtype, ctx.has_bias = dtype, x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # grad [..., out]
        x_low, weight = ctx.saved_tensors
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return *linear_backward(grad, x_low, weight, ctx.dtype, ctx.x_dtype, needs_grad), None


def own_backward_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A product this module's autograd functions may compute: a gradient to compute, a plain
    tensor weight (not a DTensor or other subclass) with no bias or an fp32 one, outside
    ``torch.compile`` (whose own partitioner decides what a compiled graph keeps)."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    plain = type(weight) in (torch.Tensor, nn.Parameter) and (bias is None or bias.dtype == torch.float32)
    return wants_grad and plain and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, without keeping the weight's autocast copy for backward where that applies."""
    dtype = autocast_cast_dtype(weight) if own_backward_applies(x, weight, bias) else None
    if dtype is None:
        return F.linear(x, weight, bias)
    return _RecastLinear.apply(x, weight, bias, dtype)


class _Packed:
    """A weight in oneDNN's layout and which weight (storage, version) it was made from."""

    def __init__(self, weight: torch.Tensor):
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.key = (weight.data_ptr(), weight._version)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and math) that uses a prepacked weight for CPU
    bf16 inference inside ``prepacked_weights`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **factory):
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.prepack = onednn_available()
        self._packed: _Packed | None = None
        self._blocks = 0  # open prepacked_weights blocks around this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_block = self.prepack and self._blocks and not torch.compiler.is_compiling()
        weight = self._onednn_weight(x) if in_block else None
        if weight is None:
            return linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")

    def reset_parameters(self) -> None:
        """nn.Linear's init, except on the meta device (nothing to draw; loading fills the weight)."""
        if not self.weight.is_meta:
            super().reset_parameters()

    def train(self, mode: bool = True) -> "Linear":
        """Training drops the packed copy (its memory, and a weight about to change)."""
        if mode:
            self._packed = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``, ...: the packed copy of the old weight goes with it."""
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Copies and pickles carry the weight, not the packed copy (made again in a block)."""
        return {**super().__getstate__(), "_packed": None, "_blocks": 0}

    def _onednn_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight oneDNN multiplies by when this call is inference on a CPU: the prepacked copy
        in bf16, the layer's own weight for a few fp32 rows; else None (``F.linear``)."""
        weight = self.weight
        inference = not self.training and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        plain = type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu" and weight.is_contiguous()
        if not (inference and plain and x.dtype == weight.dtype and x.is_contiguous() and x.device.type == "cpu"):
            return None  # NOTE: F.linear itself rounds differently for a strided input; keep its result
        if weight.dtype == torch.float32:
            few_rows = 0 < x.numel() <= FP32_ONEDNN_MAX_ROWS * x.shape[-1]
            return weight if few_rows and (self.bias is None or self.bias.dtype == torch.float32) else None
        if weight.dtype != torch.bfloat16 or not prepacking_available() or weight.is_inference():
            return None  # NOTE: an inference tensor has no version to check the packed copy against
        if self._packed is None or self._packed.key != (weight.data_ptr(), weight._version):
            self._packed = None  # free the stale copy before making the new one
            self._packed = _Packed(weight)
        return self._packed.tensor
