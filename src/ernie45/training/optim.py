"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step (linear warm-up, then cosine / linear decay to
``min_lr``, or constant), so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .config import LRSchedulerConfig, OptimizerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms and biases (1-D) are not decayed. Only the parameters that
    train (a LoRA model: its adapters), and no empty group.

    NOTE: DCP's flattened optimizer state cannot be loaded back into an empty group (a LoRA model
    has no 1-D parameter that trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The section's optimizer (AdamW or Adam) over the model's fp32 master parameters; its state is fp32 like them."""
    return config.build(parameter_groups(model, config.weight_decay))


def lr_at(step: int, total_steps: int, base_lr: float, config: LRSchedulerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``."""
    warmup = config.lr_warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if config.lr_decay_style == "constant":
        return base_lr
    decay_steps = config.lr_decay_steps or total_steps
    progress = min(max((step - warmup) / max(decay_steps - warmup, 1), 0.0), 1.0)
    if config.lr_decay_style == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        scale = 1.0 - progress
    return config.min_lr + (base_lr - config.min_lr) * scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(
    parameters: list[torch.Tensor],
    max_norm: float | None,
    group: dist.ProcessGroup | None = None,
    uncounted: list[torch.Tensor] = (),
) -> float:
    """The global L2 norm of the gradients, scaled down to ``max_norm`` when above it (None: no clipping).

    Pipeline stages: ``group`` (``model.pipeline.group``) holds the rest of the model, whose squares
    are added; ``uncounted`` (``model.pipeline.tied_copies()``) are scaled but not counted, as
    another rank holds the same gradient.
    NOTE: works on plain tensors and on DTensors from different meshes (FSDP2 dense weights and
    expert-parallel experts live on different meshes, which one ``torch.stack`` cannot mix).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    skipped = {id(p.grad) for p in uncounted}
    squares = []
    for grad in (g for g in grads if id(g) not in skipped):
        square = torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        squares.append(square.full_tensor() if hasattr(square, "full_tensor") else square)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if group is not None:
        dist.all_reduce(total, group=group)
    total = total.sqrt()
    if max_norm is not None:
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
    return float(total)
