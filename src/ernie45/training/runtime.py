"""Where this process runs: rank, world size, device, and the few collectives the recipe needs.

One process (``ernie45 finetune``) runs without a process group. Under torchrun (or
``--nproc-per-node N``, which starts torchrun's machinery) the environment names the rank and
world, and the default process group is started here: nccl on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, DistEnvConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def set_cpu_threads(config: DistEnvConfig) -> None:
    """``cpu_threads``, or the cores shared evenly by the local ranks.

    NOTE: oversubscribed cores make every rank wait on the others' threads; and for tiny
    matrices one thread can beat several (the embedded default sets cpu_threads: 1).
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))


def check_backend(config: DistEnvConfig) -> None:
    """nccl without a GPU would fail inside init_process_group, once per rank, with a stack trace."""
    if config.backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ConfigError(
            "dist_env.backend=nccl needs CUDA GPUs and torch sees none here: pass --dist_env.backend=auto "
            "(gloo on CPU) or run on GPUs"
        )


def init_runtime(config: DistEnvConfig) -> Runtime:
    """Start the process group when launched by torchrun; pick this rank's device."""
    use_cuda = torch.cuda.is_available() and config.backend != "gloo"
    if not use_cuda:
        set_cpu_threads(config)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Runtime(0, 1, 0, torch.device("cuda") if use_cuda else torch.device("cpu"))
    check_backend(config)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=config.timeout_minutes))
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over ranks (a no-op in one process)."""
    if runtime.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(value, runtime: Runtime):
    """Rank 0's ``value`` on every rank (e.g. a timestamped output directory)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
