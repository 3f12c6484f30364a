"""Resumable training checkpoints: ``CHECKPOINT_DIR/step_N/``, written atomically.

Each checkpoint holds
  * ``model`` + ``optim``: ``torch.distributed.checkpoint`` (DCP) files; every rank writes its own
    shards, so a sharded (FSDP/EP/TP) model is never gathered;
  * ``train_state.json``: step, epoch and examples consumed (the data position: the order of the
    examples is a function of the step, see ``data.GlobalBatchSampler``);
  * ``rng_rank{R}.pt``: each rank's Python and torch (CPU and CUDA) generator states.

Writes go to a temporary directory beside the target, renamed to ``step_N`` only when complete
(``AtomicDirectory``): a run killed while saving leaves the previous checkpoints intact and usable,
and ``latest_checkpoint`` never returns a half-written one.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..checkpoint import AtomicDirectory
from .rng import rng_state, set_rng_state
from .runtime import Runtime, barrier, broadcast_object

STEP_DIR = re.compile(r"step_(\d+)")
TRAIN_STATE = "train_state.json"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first (temporary directories are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = STEP_DIR.fullmatch(path.name)
        if match and (path / TRAIN_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    runtime: Runtime,
    keep_last_n: int | None,
) -> Path:
    """Write ``checkpoint_dir/step_{step}`` from every rank (collective), then prune old ones."""
    target = checkpoint_dir / f"step_{step}"
    model_state, optim_state = get_state_dict(model, optimizer)
    if runtime.is_main:
        atomic = AtomicDirectory(target)
        tmp = atomic.__enter__()
    tmp = broadcast_object(str(tmp) if runtime.is_main else None, runtime)
    try:
        with warnings.catch_warnings():
            # NOTE: one process without a process group is a supported DCP mode, not a mistake.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(rng_state(), Path(tmp) / f"rng_rank{runtime.rank}.pt")
        if runtime.is_main:
            # NOTE: written last: its presence marks the checkpoint as complete.
            (Path(tmp) / TRAIN_STATE).write_text(json.dumps(train_state, indent=2) + "\n")
        barrier(runtime)
    except BaseException as err:
        if runtime.is_main:
            atomic.__exit__(type(err), err, err.__traceback__)
        raise
    if runtime.is_main:
        atomic.__exit__(None, None, None)
        prune_checkpoints(checkpoint_dir, keep_last_n)
    barrier(runtime)
    return target


def prune_checkpoints(checkpoint_dir: Path, keep_last_n: int | None) -> None:
    """Delete all but the newest ``keep_last_n`` complete checkpoints."""
    if keep_last_n is None:
        return
    for _, path in list_checkpoints(checkpoint_dir)[:-keep_last_n]:
        shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(checkpoint_dir: Path) -> None:
    """Delete temporary directories left by a run killed while saving."""
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.glob(".step_*"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns its train state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{runtime.rank}.pt"
    if not rng_file.is_file():  # resumed on more ranks than saved: rank 0's generators
        rng_file = path / "rng_rank0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAIN_STATE).read_text())
