"""Saving a model's files into a directory that may hold other things (a tokenizer, a README, a run).

As transformers' ``save_pretrained``, a save replaces only the model's own files (config.json,
generation_config.json, model*.safetensors and the index), removes the shards of a previous save
that the new one does not have, and keeps everything else. Unlike it, a failed or interrupted save
never damages the checkpoint that was there:

1. Every new file is written into a hidden staging folder inside the directory (the same file
   system, so moving a file out of it is one atomic rename) and fsynced. Disk full, a read-only
   folder, an exception or a kill here leaves the directory's files as they were; the folder is
   removed at once, or after a kill by the next save into the directory.
2. ``commit`` renames the files into place and removes the previous save's leftovers, in an order
   that keeps each moment loadable (see its NOTE): renames and unlinks, which need no free space
   and take milliseconds, not the minutes that writing the weights takes.

The cost: while it is written, the new checkpoint and the old one share the disk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from .safetensors_io import INDEX_FILE, SINGLE_FILE, fresh_directory

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_ENTRY_POINTS = {SINGLE_FILE, INDEX_FILE}
_STAGING = re.compile(r"\.ernie45-save-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(OSError):
    """A save failed: one line naming the file, why, and the state the directory was left in."""


def _io_failure(err: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) of an I/O failure, including one safetensors reports as its own error type."""
    if isinstance(err, OSError):
        return err.errno, err.strerror or str(err)
    # NOTE: safetensors' writer wraps the OS error in text: "I/O error: <reason> (os error <errno>)".
    found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(err)) if isinstance(err, SafetensorError) else None
    return (int(found[2]), found[1]) if found else None


def write_failure(err: BaseException, path: Path) -> CheckpointWriteError | None:
    """The one-line error for ``err`` raised while writing ``path`` (None: not an I/O failure).

    Only for failures before ``commit``: then the directory's files are untouched, as it says."""
    failure = _io_failure(err)
    if failure is None:
        return None
    code, reason = failure
    if code in _NO_SPACE:
        message = f"no space left on device while writing {path}; the previous checkpoint is intact"
    else:
        message = f"could not write {path}: {reason}; the previous checkpoint is intact"
    error = CheckpointWriteError(message)
    error.errno = code
    return error


class StagedSave:
    """``with StagedSave(directory) as staged:`` write each file at ``staged.file(name)``; when the
    block ends without an exception they replace their namesakes in ``directory`` (``commit``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.names: list[str] = []

    def __enter__(self) -> StagedSave:
        if self.directory.is_file():
            raise CheckpointWriteError(f"cannot save a checkpoint into {self.directory}: it is a file, not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # NOTE: with the umask, as transformers
            _remove_abandoned_staging(self.directory)
            prefix = f".ernie45-save-{socket.gethostname()}-{os.getpid()}-"
            self.staging = fresh_directory(self.directory, prefix)
        except OSError as err:
            raise write_failure(err, self.directory) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    @contextmanager
    def file(self, name: str) -> Iterator[Path]:
        """``with staged.file(name) as path:`` write ``path``; it is fsynced and staged to replace
        ``directory/name``. An I/O failure becomes one ``CheckpointWriteError`` naming that file."""
        path = self.staging / name
        try:
            # NOTE: safetensors creates its files 0600 (transformers' model.safetensors is too); every
            # file here gets the mode the umask gives a new file (0644 under 022), like config.json.
            path.touch()
            mode = path.stat().st_mode & 0o777
            yield path
            os.chmod(path, mode)
            _fsync(path)
        except (OSError, SafetensorError) as err:
            failure = write_failure(err, self.directory / name)
            if failure is None:
                raise
            raise failure from None
        self.names.append(name)

    def commit(self) -> None:
        """Put the staged files in place; then remove the previous save's model files that the new
        save does not have (its shards, or its single file / index when the layout changed)."""
        stale = {
            name for name in os.listdir(self.directory)
            if (name in _ENTRY_POINTS or _SHARD.fullmatch(name)) and name not in self.names
        }
        # NOTE: the order keeps each moment loadable: (1) new shards, which no index names yet;
        # (2) the weights' entry point (index or model.safetensors), so a complete set of new
        # weights appears at once; (3) the other layout's stale entry point, so readers never find
        # both (ours prefers the index, transformers the single file); (4) generation_config.json,
        # then config.json: a config is never newer than the weights it describes; (5) stale shards,
        # which nothing names any more. A crash inside (1)-(4) can pair old and new files for those
        # milliseconds; an interrupted write before them leaves only the previous checkpoint.
        order = sorted(self.names, key=_commit_rank)
        try:
            self._move([name for name in order if _commit_rank(name) < 2])
            self._remove(stale & _ENTRY_POINTS)
            self._move([name for name in order if _commit_rank(name) >= 2])
            self._remove(stale - _ENTRY_POINTS)
        except OSError as err:
            raise CheckpointWriteError(
                f"could not put the new checkpoint in place in {self.directory}: {err.strerror or err}; "
                "it may now mix files of the previous and the new save"
            ) from None
        # NOTE: makes the renames survive a power cut; some network file systems refuse to fsync a
        # directory, and there the files are in place all the same.
        with suppress(OSError):
            _fsync(self.directory)

    def _move(self, names: list[str]) -> None:
        for name in names:
            os.replace(self.staging / name, self.directory / name)

    def _remove(self, names: set[str]) -> None:
        for name in sorted(names):
            (self.directory / name).unlink(missing_ok=True)


def _commit_rank(name: str) -> int:
    """Commit order: shards 0, the weights' entry point 1, generation config 2, anything else 3, config.json 4."""
    if _SHARD.fullmatch(name):
        return 0
    if name in _ENTRY_POINTS:
        return 1
    return {GENERATION_CONFIG_FILE: 2, CONFIG_FILE: 4}.get(name, 3)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned_staging(directory: Path) -> None:
    """Delete staging folders left by a save on this host whose process no longer runs (a kill)."""
    host = socket.gethostname()
    for name in os.listdir(directory):
        found = _STAGING.fullmatch(name)
        if found and found["host"] == host and not _process_alive(int(found["pid"])):
            shutil.rmtree(directory / name, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # NOTE: signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True
