"""``parallelize_model``: apply a layout to a single-device model, in the order the wrappers need.

Pipeline parallelism first: each rank keeps only its stages' layers (pipeline.py). Then TP (it
replaces weights by DTensors on the ``tp`` mesh), then EP (experts become
``Shard(0)`` DTensors on ``ep`` and the all-to-all dispatcher is installed), then CP (attention
gathers K/V over ``cp``; inputs come from ``shard_sequence``), then activation
checkpointing (hooks on each block), then FSDP2 last, since it shards whatever the others left
(with the pipeline stages as its roots).
Works on a model built on the meta device too (that is how ``from_pretrained`` uses it).
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

from .activation_checkpoint import apply_activation_checkpointing
from .config import ParallelConfig, check_model_fits, plan_stages
from .context_parallel import apply_context_parallel
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp
from .mesh import ParallelMeshes, build_meshes
from .pipeline import Pipeline, keep_stages
from .tensor_parallel import apply_tensor_parallel

logger = logging.getLogger(__name__)


def parallelize_model(model: nn.Module, parallel: ParallelConfig | ParallelMeshes) -> ParallelMeshes:
    """Lay ``model`` out over the running process group in place; returns the meshes used."""
    check_model_fits(parallel.parallel if isinstance(parallel, ParallelMeshes) else parallel, model.config)
    meshes = parallel if isinstance(parallel, ParallelMeshes) else build_meshes(parallel)
    layout = meshes.parallel
    split = None
    if meshes.pp is not None:
        split = plan_stages(layout, model.config, model.moe_config)
        if dist.get_rank() == 0:
            logger.info("pipeline split (%s):\n%s", layout.pp_schedule, split.describe())
        keep_stages(model, split, split.stages_of(meshes.pp.get_local_rank()))
    if meshes.tp is not None:
        apply_tensor_parallel(model, meshes.tp, sharded_logits=layout.sharded_logits)
    if meshes.ep is not None:
        apply_expert_parallel(model, meshes.ep)
    if meshes.cp is not None:
        apply_context_parallel(model, meshes.cp.get_group())
    if layout.activation_checkpointing:
        apply_activation_checkpointing(model)
    pipeline = Pipeline(model, meshes, split) if split is not None else None
    apply_fsdp(model, meshes, pipeline.stages if pipeline is not None else None)
    if pipeline is not None:
        model.pipeline = pipeline
    return meshes
