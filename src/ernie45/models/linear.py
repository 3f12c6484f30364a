"""The model's linear layer: ``nn.Linear``, plus oneDNN-prepacked weights for CPU bf16 inference.

On a CPU, ``F.linear`` in bf16 re-lays the weight out for oneDNN on every call: for one token
(decode) that costs as much as the product itself (a [103424, 1024] head: 13 ms plain, 6.5 ms
prepacked; a [3072, 1024] projection 3x). So in inference (eval mode, no autograd needed, bf16
weights, contiguous bf16 input) the layer multiplies by a copy of its weight in oneDNN's own
layout, made on first use and kept until the weight changes (its storage or version) or the
module goes back to training. The product is the same oneDNN kernel on the same numbers: the
result is bitwise equal to ``F.linear`` (tested). The price is one extra copy of the linear
weights while the model does inference; ``BackendConfig(prepack_cpu_inference=False)`` (or
``set_prepacking(model, False)``) turns it off. FSDP turns it off: its weights are gathered per
forward, and a packed copy would keep the whole gathered weight on every rank.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def prepacking_available() -> bool:
    """oneDNN is built in and this CPU multiplies bf16 with it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def set_prepacking(model: nn.Module, enabled: bool) -> None:
    """Turn the prepacked inference weights of every ``Linear`` in ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.prepack = enabled and prepacking_available()
            module._packed = None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and math) that uses a prepacked weight in CPU
    bf16 inference when ``prepack`` is on (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **factory):
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.prepack = prepacking_available()
        self._packed: tuple[torch.Tensor, int, int] | None = None  # (packed weight, data_ptr, version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight(x) if self.prepack and not torch.compiler.is_compiling() else None
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

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
        """Copies and pickles carry the weight, not the packed copy (rebuilt on first use)."""
        return {**super().__getstate__(), "_packed": None}

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prepacked weight when this call is inference on a CPU in bf16, else None."""
        weight = self.weight
        inference = not self.training and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        plain = type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu" and weight.is_contiguous()
        plain = plain and not weight.is_inference()  # NOTE: an inference tensor has no version to check
        if not (inference and plain and weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16):
            return None
        if not x.is_contiguous() or x.device.type != "cpu":
            return None  # NOTE: F.linear itself rounds differently for a strided input; keep its result
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[1:] != key:
            self._packed = None  # free the stale copy before making the new one
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), *key)
        return self._packed[0]
