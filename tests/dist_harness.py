"""Run a function on N local ranks with real gloo process groups (loopback, a free port each time).

Ranks are forked from the test process, so they start in milliseconds with torch already
imported; each uses one thread so that 4 ranks fit the 2-core test machine.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, init: bool, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args, init: bool = True) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; re-raise any rank's error.

    ``init=False`` leaves the process group to the code under test (torchrun's environment is set).
    """
    mp.start_processes(
        _rank_main, args=(world_size, free_port(), init, fn, args), nprocs=world_size, join=True, start_method="fork"
    )
