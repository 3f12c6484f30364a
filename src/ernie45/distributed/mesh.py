"""Process group start-up and the two device meshes a layout needs.

* ``world``: ``(pp, dp_replicate, dp_shard, cp, tp)``, tp innermost so tensor-parallel peers are
  neighbouring ranks (same host), pp outermost so each pipeline stage is a block of ranks. Dense parameters are sharded by FSDP2 over the data-parallel
  dims with cp folded in (``dp_shard_cp``: cp peers hold different tokens of the same sequences,
  so their gradients are summed like data-parallel ones) and by TP over ``tp``.
* ``experts``: ``(pp, ep_shard, ep)`` over the same ranks, ep innermost. Routed experts are split
  ``Shard(0)`` over ``ep`` and FSDP2-sharded over ``ep_shard``, within each pipeline stage.
  Built only when ``ep > 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig


def default_device() -> torch.device:
    """This rank's accelerator (``LOCAL_RANK``-th GPU) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ensure_process_group() -> None:
    """Initialise the default process group from torchrun's environment if nobody has yet."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"parallel loading needs a process group: environment variable(s) {missing} are not set; "
            "launch with torchrun (e.g. torchrun --nproc-per-node=8 train.py) or call "
            "torch.distributed.init_process_group first"
        )
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@dataclass(frozen=True)
class ParallelMeshes:
    """The meshes of a resolved layout; the properties return None for dims of size 1."""

    parallel: ParallelConfig
    world: DeviceMesh
    experts: DeviceMesh | None

    @property
    def dp(self) -> DeviceMesh | None:
        """FSDP2's mesh: 1-D ``dp_shard`` (x ``cp``), or 2-D ``(dp_replicate, dp_shard x cp)`` for HSDP."""
        if self.parallel.data_parallel * self.parallel.cp == 1:
            return None
        shard = "dp_shard_cp" if self.parallel.cp > 1 else "dp_shard"
        return self.world["dp_replicate", shard] if self.parallel.dp_replicate > 1 else self.world[shard]

    @property
    def pp(self) -> DeviceMesh | None:
        return self.world["pp"] if self.parallel.pp > 1 else None

    @property
    def cp(self) -> DeviceMesh | None:
        return self.world["cp"] if self.parallel.cp > 1 else None

    @property
    def tp(self) -> DeviceMesh | None:
        return self.world["tp"] if self.parallel.tp > 1 else None

    @property
    def ep(self) -> DeviceMesh | None:
        return self.experts["ep"] if self.experts is not None else None

    @property
    def ep_shard(self) -> DeviceMesh | None:
        return self.experts["ep_shard"] if self.experts is not None else None


def build_meshes(parallel: ParallelConfig, device_type: str | None = None) -> ParallelMeshes:
    """Resolve ``parallel`` against the running world and build its meshes (collective)."""
    if not dist.is_initialized():
        raise RuntimeError("build_meshes needs an initialised process group (see ensure_process_group)")
    parallel = parallel.resolve(dist.get_world_size())
    device_type = device_type or default_device().type
    world = init_device_mesh(
        device_type,
        (parallel.pp, parallel.dp_replicate, parallel.dp_shard, parallel.cp, parallel.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"),
    )
    if parallel.cp > 1:
        world["dp_shard", "cp"]._flatten("dp_shard_cp")
    experts = None
    if parallel.ep > 1:
        experts = init_device_mesh(
            device_type, (parallel.pp, parallel.ep_shard, parallel.ep), mesh_dim_names=("pp", "ep_shard", "ep")
        )
    return ParallelMeshes(parallel, world, experts)
