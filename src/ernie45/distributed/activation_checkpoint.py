"""Activation checkpointing per decoder block that cannot change MoE routing on recompute.

Each block keeps only its inputs in forward and recomputes the rest in backward (composable
``checkpoint``: hooks, no wrapper module, so parameter names and checkpoints are unchanged).
In MoE blocks the first forward records the indices of every ``topk`` (the router's choice of
experts) and the recompute replays them instead of recomputing, so the experts that receive
gradients are exactly those that ran forward even if a recomputed score differed in the last
bit. The recompute also restores the MoE layer's record of its forward (``last_record``: expert
loads, router scores), so expert load is counted once per forward, never again in backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from ..moe.layer import MoELayer
from .model_parts import decoder_blocks, moe_layer


class _TopkReplay(TorchDispatchMode):
    """Records (forward) or replays (recompute) the indices of each ``aten.topk``, in call order.

    NOTE: not selective checkpointing (``create_selective_checkpoint_contexts``): that one
    insists every op of the recompute ran in the forward too, which FSDP2's hooks break.
    """

    def __init__(self, indices: list[torch.Tensor], replay: bool):
        super().__init__()
        self.indices = indices
        self.replay = replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.aten.topk.default:
            return func(*args, **kwargs)
        if not self.replay:
            values, indices = func(*args, **kwargs)
            self.indices.append(indices)
            return values, indices
        indices = self.indices.pop(0)
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        return args[0].gather(dim, indices), indices


@contextlib.contextmanager
def _keeping_forward_record(mlp: MoELayer) -> Iterator[None]:
    """Put back the MoE layer's ``last_record`` of the forward after the recompute replaced it."""
    record = mlp.last_record
    try:
        yield
    finally:
        mlp.last_record = record


def _moe_contexts(mlp: MoELayer) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recompute context) for one checkpointed forward of an MoE block."""
    indices: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        with _TopkReplay(indices, replay=True), _keeping_forward_record(mlp):
            yield

    return _TopkReplay(indices, replay=False), recompute()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder block of ``model`` in place."""
    for block in decoder_blocks(model):
        _checkpoint_block(block)


def _checkpoint_block(block: nn.Module) -> None:
    mlp = moe_layer(block)
    if mlp is None:
        checkpoint(block)
    else:
        checkpoint(block, context_fn=partial(_moe_contexts, mlp))


def set_activation_checkpointing(model: nn.Module, enabled: bool, every_n_layers: int = 1) -> None:
    """Turn block checkpointing on for blocks 0, n, 2n, ... (applied the first time) and off for the
    rest (their hooks stay, idle): what transformers' ``activation_checkpointing_enable`` /
    ``_disable`` switch, with its ``every_n_layers`` rule."""
    for index, block in enumerate(decoder_blocks(model)):
        on = enabled and index % every_n_layers == 0
        state = checkpoint.state(block)
        if state is not None:
            state.enable_hook = on
        elif on:
            _checkpoint_block(block)


def is_checkpointed(model: nn.Module) -> bool:
    """Whether any decoder block of ``model`` recomputes in backward."""
    states = [checkpoint.state(block) for block in decoder_blocks(model)]
    return any(state is not None and state.enable_hook for state in states)
