"""Where this process runs: rank, world size, device, and the few collectives the recipe needs.

One process (``ernie45 finetune``) runs without a process group. Under torchrun (or
``--nproc-per-node N``, which starts torchrun's machinery) the environment names the rank and
world, and the default process group is started here: nccl on GPUs, gloo on CPUs.

How a run ends is decided here too: ``RunStopped`` carries a one-line reason and the exit code
(``EXIT_*``, listed in the README); ``StopSignals`` turns SIGTERM/SIGINT into a request that the
training loop honours at the next step boundary, on every rank at once.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, DistEnvConfig
from ..host_memory import keep_freed_host_memory, leave_host_memory_alone

EXIT_FAILED = 1  # a rank failed (or a collective timed out)
EXIT_BAD_INPUT = 2  # the recipe, the data or the output directory cannot be used; or the disk is full
EXIT_NONFINITE = 3  # the loss, gradient norm or weights became NaN/inf
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: try again with --resume)


class RunStopped(Exception):
    """The run stops on purpose: ``str(err)`` is the one line to show, ``exit_code`` says why.

    ``collective``: every rank raises the same one, so only rank 0 needs to print it.
    """

    def __init__(self, message: str, exit_code: int, collective: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.collective = collective


class Preempted(RunStopped):
    """Stopped by a signal after saving ``checkpoint`` (the launcher adds how to resume)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message, EXIT_PREEMPTED)
        self.checkpoint = checkpoint


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
        if config.keep_host_memory:
            keep_freed_host_memory()
        else:
            leave_host_memory_alone()
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


def gather_objects(value, runtime: Runtime) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def first_message(message: str | None, runtime: Runtime) -> str | None:
    """The lowest rank's non-None ``message`` (a failure one rank saw), the same on every rank."""
    return next((m for m in gather_objects(message, runtime) if m is not None), None)


def collective_timeout(err: RuntimeError, runtime: Runtime, timeout_minutes: int) -> str | None:
    """The one line for a collective that timed out on this rank (None: ``err`` is something else).

    NOTE: gloo raises a RuntimeError "... Timed out waiting 1800000ms for recv operation ..."; NCCL's
    watchdog aborts the process itself, after logging the rank, the operation and the timeout.
    """
    if not (runtime.distributed and "timed out" in str(err).lower()):
        return None
    return (
        f"rank {runtime.rank} waited dist_env.timeout_minutes={timeout_minutes} for the other ranks in a collective "
        "and gave up: another rank stopped or hangs (see its output)"
    )


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM/SIGINT only set ``stop.received`` (e.g. "SIGTERM").

    The loop reads it once a step and all ranks agree on it (see ``Trainer.train_step``), so
    every rank checkpoints after the same step. Handlers can only be set in the main thread;
    elsewhere (a caller's worker thread) signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
