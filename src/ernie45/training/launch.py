"""``ernie45 finetune``: read the recipe, then train here or start N local ranks with torchrun's machinery.

``--nproc-per-node N`` starts N copies of this same command through
``torch.distributed.launcher`` (what ``torchrun --standalone`` uses); each copy sees torchrun's
environment and runs one rank. Started under an external ``torchrun``, the command is already a
rank and trains directly.

Exit codes (``runtime.EXIT_*``): 0 done; 1 a rank failed; 2 bad input (recipe, data, an output
directory in use or holding another run) or a full disk; 3 NaN/inf training; 75 stopped by
SIGTERM/SIGINT after a checkpoint (the message says how to resume).
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import typer

from .config import ConfigError, RecipeConfig, load_recipe, parse_overrides
from .runtime import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    Preempted,
    RunStopped,
    Runtime,
    check_backend,
    launched_by_torchrun,
)
from .tracking import check_trackers


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def default_output_dir() -> str:
    return str(Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}")


def finetune(
    config_path: str | None,
    extra_args: list[str],
    output_dir: str | None,
    resume: bool,
    nproc_per_node: int,
    overwrite: bool = False,
    strict: bool = False,
) -> None:
    """The whole command: validate everything first, then train (or launch the ranks that will).

    ``strict``: a component that cannot run here is an error instead of the nearest one (``compat``)."""
    if config_path is not None and config_path.startswith("--"):
        # NOTE: click hands the first unknown option to the optional CONFIG argument; it is an override.
        config_path, extra_args = None, [config_path, *extra_args]
    if nproc_per_node < 1:
        fail(f"--nproc-per-node={nproc_per_node} must be at least 1")
    try:
        overrides = parse_overrides(extra_args)
        if output_dir is not None:
            overrides["output_dir"] = output_dir
        config = load_recipe(Path(config_path) if config_path else None, overrides, strict)
        check_trackers(config)
    except ConfigError as err:
        fail(str(err))
    spawning = nproc_per_node > 1 and not launched_by_torchrun()
    if not spawning and int(os.environ.get("RANK", 0)) == 0:
        # NOTE: once per run: by the process that trains, or by rank 0 of the ranks the launcher starts.
        for line in config.notices:
            typer.echo(line, err=True)
    check_output_dir(config.output_dir, resume)
    config.output_dir = config.output_dir or default_output_dir()
    rank_args = [*extra_args, *(["--strict"] if strict else [])]  # NOTE: what each rank and a resume repeat
    command = resume_command(config_path, rank_args, config.output_dir, nproc_per_node)
    if not launched_by_torchrun():
        # NOTE: before building anything or starting ranks; the run checks again holding the lock.
        check_run_dir(config, resume, overwrite)
    if spawning:
        check_layout(config, nproc_per_node)
        launch_ranks(config_path, rank_args, config, resume, nproc_per_node, command)
        return
    from .recipe import run

    try:
        run(config, resume=resume, overwrite=overwrite)
    except RunStopped as err:
        stopped(err, command)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        # NOTE: bad input found while building (a missing dataset file, a layout the model cannot
        # take, ...) is reported like a config error, without a stack trace.
        fail(str(err))


def resume_command(config_path: str | None, extra_args: list[str], output_dir: str, nproc: int) -> str:
    """The command line that continues this run."""
    args = ["ernie45", "finetune", *([config_path] if config_path else []), *extra_args, f"--output_dir={output_dir}"]
    command = shlex.join([*args, *([f"--nproc-per-node={nproc}"] if nproc > 1 else []), "--resume"])
    if nproc == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"your torchrun command with: {command}"
    return command


def stopped(err: RunStopped, command: str) -> None:
    """Print why the run stopped (once, on rank 0, when every rank stopped alike) and exit with its code."""
    if not err.collective or int(os.environ.get("RANK", 0)) == 0:
        hint = f"; resume with: {command}" if isinstance(err, Preempted) and err.checkpoint else ""
        typer.echo(f"{'' if isinstance(err, Preempted) else 'error: '}{err}{hint}", err=True)
    raise typer.Exit(err.exit_code)


def check_run_dir(config: RecipeConfig, resume: bool, overwrite: bool) -> None:
    """The output directory checks of ``rundir`` (in use, another run's, --overwrite), before any rank starts."""
    from .rundir import check_reuse, checkpoint_dir_of

    output_dir = Path(config.output_dir).resolve()
    try:
        check_reuse(output_dir, checkpoint_dir_of(config, output_dir), resume, overwrite)
    except ConfigError as err:
        fail(str(err))


def check_output_dir(output_dir: str | None, resume: bool) -> None:
    """Refuse, before anything is built, an OUTPUT_DIR that is a file and a --resume with no run to continue."""
    if output_dir is None:
        if resume:
            fail("--resume continues an earlier run: pass its --output_dir (else each run gets a new runs/<timestamp>)")
        return
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        fail(f"output_dir {output_dir} is a file, not a folder; pass another --output_dir")


def check_layout(config: RecipeConfig, nproc: int) -> None:
    """Refuse a layout that cannot fit ``nproc`` ranks here, a backend or a model path that cannot work, once,
    before starting any of them (each rank would report it with its own stack trace)."""
    import torch

    from .components import check_context_parallel_rope, parallel_config, resolve_model_path

    try:
        parallel_config(config, Runtime(rank=0, world_size=nproc, local_rank=0, device=torch.device("cpu")))
        check_backend(config.dist_env)
        resolve_model_path(config)
        check_context_parallel_rope(config)
    except ConfigError as err:
        fail(str(err))


def launch_ranks(config_path: str | None, extra_args: list[str], config: RecipeConfig, resume: bool, nproc: int, command: str) -> None:
    """Run ``ernie45 finetune`` as ``nproc`` local ranks (c10d rendezvous on a free port).

    The ranks print their own one-line outcome; this process exits with their code. SIGTERM/SIGINT
    here reach every rank (torchelastic forwards them), which checkpoint and stop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = ["-m", "ernie45.cli", "finetune", *([config_path] if config_path else []), *extra_args]
    args += [f"--output_dir={config.output_dir}", f"--nproc-per-node={nproc}"] + (["--resume"] if resume else [])
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # NOTE: the ranks say what happened
    started = time.time()
    try:
        elastic_launch(launch, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        code = err.get_first_failure()[1].exitcode
        if code in (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED):
            raise typer.Exit(code) from None  # NOTE: rank 0 printed the reason
        codes = ", ".join(f"rank {rank}: {failure.exitcode}" for rank, failure in sorted(err.failures.items()))
        typer.echo(f"error: {len(err.failures)} rank(s) failed (exit codes {codes}); their messages are above", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except SignalException as err:
        signal_name = err.sigval.name
        if saved_since(config, started):
            raise typer.Exit(EXIT_PREEMPTED) from None  # NOTE: rank 0 printed where it saved and how to resume
        typer.echo(f"error: stopped by {signal_name} before the ranks saved a checkpoint; resume with: {command}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def saved_since(config: RecipeConfig, started: float) -> bool:
    """Whether the ranks saved a checkpoint on a stop signal after ``started`` (a time.time())."""
    from .checkpointing import latest_checkpoint, read_train_state
    from .rundir import checkpoint_dir_of

    newest = latest_checkpoint(checkpoint_dir_of(config, Path(config.output_dir).resolve()))
    return newest is not None and newest.stat().st_mtime >= started and bool((read_train_state(newest) or {}).get("stopped_by"))
