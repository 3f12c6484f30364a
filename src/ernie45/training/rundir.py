"""The output directory belongs to one run: reuse is refused, ``--overwrite`` moves the old run aside,
and a lock file keeps a second concurrent run out.

Rank 0 decides (``claim_output_dir``); the command runs ``check_reuse`` first, so a refusal is
one line before anything is built or any rank starts.

``OUTPUT_DIR/run.lock`` holds the owner's pid, host and process start time. It is created
atomically (``O_EXCL``) and removed when the run ends, however it ends short of a kill; a lock
whose process is gone (same host, no such pid, or a pid since reused by another process) is
stale and taken over with a notice. A lock from another host is respected: delete it by hand if
that run is gone.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpointing import list_checkpoints, remove_incomplete
from .config import ConfigError, RecipeConfig
from .runtime import EXIT_BAD_INPUT, RunStopped, Runtime, broadcast_object

LOCK = "run.lock"
# What a run leaves in its output directory (besides checkpoints). NOTE: not config.yaml, a common
# name for a user's own recipe (a run writes metrics.jsonl right after it anyway).
RUN_FILES = ("metrics.jsonl", "summary.json", "hf", "tokenizer")


def checkpoint_dir_of(config: RecipeConfig, output_dir: Path) -> Path:
    """``checkpoint.checkpoint_dir``: default OUTPUT_DIR/checkpoints, relative ones under OUTPUT_DIR."""
    return output_dir / (config.checkpoint.checkpoint_dir or "checkpoints")


def notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- the lock ------------------------------------------------------------------------------------
def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell it from a later process with
    the same pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # NOTE: field 22; the command name before ")" may hold spaces


def this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def holder_alive(holder: dict) -> bool:
    """Whether the process that wrote a lock may still run (a lock from another host always may)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # NOTE: it exists, owned by another user
    return holder.get("start") is None or process_start(pid) in (None, holder["start"])


def read_lock(path: Path) -> dict | None:
    """The lock's owner, {} when it is unreadable (being written), None when there is no lock."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    if not holder:
        return "a run whose lock is being written"
    return f"pid {holder.get('pid')} on {holder.get('host')}"


def live_holder(output_dir: Path) -> dict | None:
    """The owner of a live lock on ``output_dir`` (None: no lock, or a stale one)."""
    holder = read_lock(output_dir / LOCK)
    if holder is None or (holder and not holder_alive(holder)):
        return None
    return holder


@dataclass
class RunLock:
    """The lock this process holds on an output directory."""

    path: Path
    owner: dict

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        """Take ``output_dir``'s lock, taking over a stale one; ConfigError when another run holds it."""
        path, owner = output_dir / LOCK, this_process()
        for _ in range(2):
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if holder is None:
                    continue  # NOTE: released in the meantime
                if holder == {} or holder_alive(holder):
                    raise ConfigError(in_use(output_dir, holder)) from None
                # NOTE: two runs taking over the same stale lock in the same millisecond could both
                # succeed; a pid+host lock cannot rule that out without a lock server.
                notice(f"taking over the stale lock {path} of {describe(holder)} (that process is gone)")
                path.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise ConfigError(f"cannot create {path}: {err.strerror}; pass a writable --output_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            return cls(path, owner)
        raise ConfigError(in_use(output_dir, read_lock(path) or {}))

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def in_use(output_dir: Path, holder: dict) -> str:
    return (
        f"output_dir {output_dir} is in use by another run ({describe(holder)}; lock file {output_dir / LOCK}): "
        "wait for it to end or stop it, or pass another --output_dir (delete the lock file only if that run is gone)"
    )


# ----- reuse ---------------------------------------------------------------------------------------
def run_files(output_dir: Path, checkpoint_dir: Path) -> list[str]:
    """The run artefacts found in ``output_dir`` (and an outside ``checkpoint_dir``), as names to show."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if list_checkpoints(checkpoint_dir):
        found.insert(0, str(checkpoint_dir.relative_to(output_dir)) if checkpoint_dir.is_relative_to(output_dir) else str(checkpoint_dir))
    return found


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``PATH.old-<timestamp>`` (a free name) and return the new name."""
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    target = path.with_name(f"{path.name}.old-{stamp}")
    number = 1
    while target.exists():
        target, number = path.with_name(f"{path.name}.old-{stamp}-{number}"), number + 1
    os.rename(path, target)
    return target


def check_reuse(output_dir: Path, checkpoint_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a directory another live run holds, and a fresh run into an old run's directory unless
    ``overwrite``, which moves the old run (and an outside checkpoint_dir) aside and says where."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite starts a new one there: pass one")
    holder = live_holder(output_dir)
    if holder is not None:
        raise ConfigError(in_use(output_dir, holder))
    found = run_files(output_dir, checkpoint_dir)
    if resume or not found:
        return
    if not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
            "choose another --output_dir, or pass --overwrite to move the old run aside"
        )
    for path in (output_dir, checkpoint_dir):
        if path.exists() and (path == output_dir or not path.is_relative_to(output_dir)):
            notice(f"--overwrite: moved the previous run's {path} to {move_aside(path)}")


def claim_output_dir(output_dir: Path, checkpoint_dir: Path, resume: bool, overwrite: bool, runtime: Runtime) -> RunLock | None:
    """Rank 0 checks ``output_dir`` (``check_reuse``), takes its lock and removes half-written
    checkpoints a killed run left; every rank gets the outcome (collective). Returns rank 0's lock."""
    lock, problem = None, None
    if runtime.is_main:
        try:
            check_reuse(output_dir, checkpoint_dir, resume, overwrite)
            lock = RunLock.acquire(output_dir)
        except ConfigError as err:
            problem = str(err)
        else:
            # NOTE: only now, holding the lock: another live run's temporary folders are its own.
            leftovers = remove_incomplete(checkpoint_dir)
            if leftovers:
                notice(f"removed what an interrupted run left half-written: {', '.join(str(p) for p in leftovers)}")
    problem = broadcast_object(problem, runtime)
    if problem is not None:
        raise RunStopped(problem, EXIT_BAD_INPUT)
    return lock
