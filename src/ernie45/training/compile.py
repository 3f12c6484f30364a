"""``torch.compile`` of each decoder block for training (the recipe's ``compile:`` section, with
NeMo AutoModel's keys).

Regional, as torchtitan compiles: each block's forward is one compiled region (the blocks share
their code, so one compilation serves them all), applied from outside after the parallel layout.
The wrappers' hooks (FSDP2, activation checkpointing) stay outside the region, eager.

* A MoE block's routed part (router, dispatch, experts, combine) runs eagerly inside its compiled
  block: routing gives data-dependent shapes and host syncs, which would recompile the block for
  every new set of expert loads (measured: 97 instead of 220 tokens/s and 12 GiB, mini-MoE bf16).
  The compiler fuses what lies around it (norms, attention's RoPE and casts, residual adds).
* Only training-mode forwards run compiled. Evaluation and generation (eval mode: new shapes on
  every call, KV caches) run the eager forward, so they never trigger a recompilation.

What it buys on a 2-core CPU in bf16 (``benchmarks/compare.py --metrics train,compile_train``,
``benchmarks/PROFILE.md``): little. Dense-0.3b 117 vs 116 tokens/s eager, the mini-MoE 236 vs 222,
at the same peak memory; the step is matmuls and the attention kernel, which compiling leaves as
they are. The first step pays the compilation (~27 s for the 0.3B with a cold cache).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed.activation_checkpoint import is_checkpointed
from ..distributed.model_parts import decoder_blocks, moe_layer

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """``torch.compile``'s keywords (AutoModel's ``CompileConfig`` names)."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None  # None: torch's automatic dynamic shapes (a second compile marks them)
    backend: str | None = None  # None: inductor
    options: dict[str, Any] = field(default_factory=dict)  # inductor options; replace ``mode``
    dynamo_cache_size_limit: int = 256

    def torch_compile_kwargs(self) -> dict[str, Any]:
        """The keywords for ``torch.compile``: ``mode`` and ``options`` are exclusive there."""
        kwargs: dict[str, Any] = {"fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.options:
            kwargs["options"] = dict(self.options)
        else:
            kwargs["mode"] = self.mode
        if self.backend is not None:
            kwargs["backend"] = self.backend
        return kwargs


def check_settings(settings: CompileSettings) -> None:
    """Values ``torch.compile`` would only refuse at the first step, refused now by name."""
    if settings.mode not in MODES:
        raise ValueError(f"mode={settings.mode!r} is not a torch.compile mode; use one of {', '.join(MODES)}")
    if settings.options and settings.mode != "default":
        raise ValueError("mode and options are exclusive in torch.compile (options replace the mode); set only one")
    if settings.dynamo_cache_size_limit < 1:
        raise ValueError(f"dynamo_cache_size_limit={settings.dynamo_cache_size_limit} must be >= 1")
    if settings.backend is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if settings.backend not in known:
            raise ValueError(f"backend={settings.backend!r} is not a torch.compile backend here; use one of {known} or null (inductor)")
    if settings.options:
        import torch._inductor

        unknown = sorted(set(settings.options) - set(torch._inductor.list_options()))
        if unknown:
            raise ValueError(f"options {unknown} are not inductor options (torch._inductor.list_options())")


def compile_blocks(model: nn.Module, settings: CompileSettings) -> None:
    """Compile every decoder block's training forward in place (names and state dict unchanged).

    Call it on the laid-out model (after FSDP2, EP and activation checkpointing). Each block's new
    forward is a method bound to that block, so a ``copy.deepcopy`` of the model (a reference or EMA
    copy) runs its own blocks, compiled as well.
    """
    check_settings(settings)
    blocks = decoder_blocks(model)
    if any(moe_layer(block) is not None for block in blocks):
        if settings.fullgraph:
            raise ValueError(
                "fullgraph=true: a MoE block's routed experts run eagerly inside its compiled forward (a graph "
                "break: their shapes follow the routing); set fullgraph to false"
            )
        if is_checkpointed(model):
            raise ValueError(
                "activation checkpointing of a MoE model cannot run compiled blocks (the recompute of a block around "
                "its eager routed experts does not match its forward); turn one of them off"
            )
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, settings.dynamo_cache_size_limit)
    kwargs = settings.torch_compile_kwargs()
    compiled: dict[Callable, Callable] = {}  # a block class's forward -> its compiled forward

    def compiled_when_training(eager: Callable) -> Callable:
        if eager not in compiled:  # NOTE: the blocks share their code: one compiled forward serves them all
            compiled[eager] = torch.compile(eager, **kwargs)
        return _when_training(eager, compiled[eager])

    for block in blocks:
        moe = moe_layer(block)
        if moe is not None:
            _rebind_forward(moe, torch.compiler.disable)
        _rebind_forward(block, compiled_when_training)


def _rebind_forward(module: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``module``'s forward by ``wrap(its class's forward)``, bound to ``module``.

    NOTE: a bound method, not a closure over ``module``: ``copy.deepcopy`` rebinds a bound method to
    the copy, while a closure would keep running the original module's weights.
    """
    unbound = type(module).forward
    if getattr(module.forward, "__func__", None) is not unbound:  # NOTE: an instance-level forward would be dropped
        raise ValueError(f"{type(module).__name__} has a forward of its own (compiled already?): compile the blocks once")
    module.forward = types.MethodType(wrap(unbound), module)


def _when_training(eager: Callable, compiled: Callable) -> Callable:
    """A forward that runs ``compiled`` in training mode and ``eager`` in eval mode."""

    @functools.wraps(eager)
    def forward(self, *args, **kwargs):
        return (compiled if self.training else eager)(self, *args, **kwargs)

    return forward

