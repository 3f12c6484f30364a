"""Resumable training checkpoints: ``CHECKPOINT_DIR/step_N/``, written atomically, verified on resume.

Each checkpoint holds
  * ``model`` + ``optim``: ``torch.distributed.checkpoint`` (DCP) files; every rank writes its own
    shards, so a sharded (FSDP/EP/TP) model is never gathered;
  * ``train_state.json``: step, epoch and examples consumed (the data position: the order of the
    examples is a function of the step, see ``data.GlobalBatchSampler``), and the ``run_id`` of
    the run that wrote it;
  * ``config.yaml``: the resolved recipe that wrote it (a resume is checked against it);
  * ``rng_rank{R}.pt``: each rank's Python and torch (CPU and CUDA) generator states;
  * ``manifest.json``, written last: every other file's size and sha256.

Writes go to a temporary directory beside the target, renamed to ``step_N`` only when complete
(``AtomicDirectory``): a run killed or out of disk while saving leaves the previous checkpoints
intact. On resume the newest checkpoint whose files match its manifest is used; a damaged one
(a truncated or zeroed shard, a missing ``.metadata``, a broken ``train_state.json``) is named
and skipped. Pruning (``keep_last_n``) only deletes older checkpoints of the same run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import AtomicDirectory
from ..checkpoint.hf_checkpoint import is_adapter_tensor
from ..peft import has_adapters
from .rng import rng_state, set_rng_state
from .runtime import EXIT_BAD_INPUT, RunStopped, Runtime, broadcast_object, first_message, gather_objects

STEP_DIR = re.compile(r"step_(\d+)")
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
FULL_BELOW = 1 << 20  # bytes: a file system with less free space than this is full


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``step_N`` directories as (step, path), oldest first, intact or not (temporary ones are not listed)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in checkpoint_dir.iterdir() if (m := STEP_DIR.fullmatch(path.name))]
    return sorted(found)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_train_state(path: Path) -> dict | None:
    """``path``'s train_state.json, or None when it is missing or unreadable."""
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


# ----- manifest: sizes and checksums --------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(path: Path, expected: dict) -> str | None:
    """What is wrong with ``path`` against its manifest entry ({"bytes", "sha256"}), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path.name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if sha256(path) != expected["sha256"]:
            return f"{path.name} does not match its sha256 (corrupted)"
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror})"
    return None


def write_manifest(directory: Path, runtime: Runtime) -> None:
    """``directory/manifest.json`` listing every file there (collective: each rank hashes its share)."""
    names = broadcast_object(sorted(p.name for p in directory.iterdir() if p.is_file()) if runtime.is_main else None, runtime)
    try:
        share = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
                 for name in names[runtime.rank :: runtime.world_size]}
    except OSError as err:
        share = err  # NOTE: sent in place of the share, so that every rank raises it, after the same collectives
    parts = gather_objects(share, runtime)
    failure = next((part for part in parts if isinstance(part, OSError)), None)
    if failure is not None:
        raise failure
    files = {name: entry for part in parts for name, entry in part.items()}
    if runtime.is_main:
        (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's {file: {"bytes", "sha256"}}; ValueError saying why it cannot be used."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise ValueError(f"{MANIFEST} is missing (an interrupted save, or written before ernie45 kept manifests)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({err})") from None
    if not isinstance(files, dict) or TRAIN_STATE not in files:
        raise ValueError(f"{MANIFEST} does not list {TRAIN_STATE}")
    return files


def checkpoint_problem(path: Path, runtime: Runtime) -> str | None:
    """Why ``path`` cannot be resumed from (None: intact); the same answer on every rank (collective)."""
    files, problem = None, None
    if runtime.is_main:
        try:
            files = read_manifest(path)
        except ValueError as err:
            problem = str(err)
    files, problem = broadcast_object((files, problem), runtime)
    if problem is not None:
        return problem
    names = sorted(files)
    mine = (file_problem(path / name, files[name]) for name in names[runtime.rank :: runtime.world_size])
    problem = next((p for p in mine if p is not None), None)
    if problem is None and runtime.is_main and read_train_state(path) is None:
        problem = f"{TRAIN_STATE} is unreadable"
    return first_message(problem, runtime)


def newest_intact(checkpoint_dir: Path, runtime: Runtime, report) -> Path | None:
    """The newest checkpoint that passes ``checkpoint_problem``; ``report(line)`` names each damaged one skipped.

    Raises RunStopped when there are checkpoints but none is intact (starting over would be a
    silent restart)."""
    checkpoints = list_checkpoints(checkpoint_dir)
    damaged = []
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path, runtime)
        if problem is None:
            return path
        damaged.append(f"{path.name}: {problem}")
        report(f"checkpoint {path} is damaged ({problem}); trying the one before")
    if damaged:
        raise RunStopped(
            f"--resume: no intact checkpoint in {checkpoint_dir} ({'; '.join(damaged)}); "
            "start a new run with --overwrite or another --output_dir",
            EXIT_BAD_INPUT,
        )
    return None


# ----- saving -------------------------------------------------------------------------------------
def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    config_yaml: str,
    runtime: Runtime,
    keep_last_n: int | None,
) -> Path:
    """Write ``checkpoint_dir/step_{step}`` from every rank (collective), then prune this run's older ones.

    An I/O failure on any rank (e.g. disk full) is agreed on by all: the temporary directory is
    removed and every rank raises the same one-line RunStopped (exit 2)."""
    target = checkpoint_dir / f"step_{step}"
    atomic = AtomicDirectory(target) if runtime.is_main else None
    tmp = Path(broadcast_object(str(atomic.__enter__()) if atomic else None, runtime))
    # NOTE: every rank runs the same collectives whatever fails locally, then all agree on the outcome.
    problem = first_message(_attempt(target, _write_state, tmp, model, optimizer, train_state, config_yaml, runtime), runtime)
    if problem is None:
        problem = first_message(_attempt(target, write_manifest, tmp, runtime), runtime)
    if problem is None and runtime.is_main:
        problem = _attempt(target, atomic.__exit__, None, None, None)
    if problem is None and runtime.is_main:
        prune_checkpoints(checkpoint_dir, step, train_state["run_id"], keep_last_n)
    problem = first_message(problem, runtime)
    if problem is not None:
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunStopped(problem, EXIT_BAD_INPUT)
    return target


def _write_state(tmp: Path, model, optimizer, train_state: dict, config_yaml: str, runtime: Runtime) -> None:
    """The DCP shards (collective), this rank's generators, and on rank 0 the config and train state."""
    model_state, optim_state = training_state(model, optimizer)
    with warnings.catch_warnings():
        # NOTE: one process without a process group is a supported DCP mode, not a mistake.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{runtime.rank}.pt")
    if runtime.is_main:
        (tmp / CONFIG).write_text(config_yaml)
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2) + "\n")


def state_options(model: torch.nn.Module) -> StateDictOptions:
    """A LoRA model's checkpoint holds only what trains (the adapters) and its optimizer state: the
    frozen base is the pretrained checkpoint (or, built from config, the seeded initialisation).

    NOTE: the optimizer state is stored per parameter name (flattened): the nested form keeps the
    param_groups of one rank only, which under pipeline parallelism name one stage's parameters, so
    a checkpoint saved with pp > 1 could not be resumed with another layout (torchtitan flattens too)."""
    lora = has_adapters(model)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora, flatten_optimizer_state_dict=True)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) as checkpointed (see ``state_options``)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(model))
    if has_adapters(model):
        # NOTE: a tied LM head and buffers (the correction bias) survive ignore_frozen_params; both are base.
        model_state = {key: value for key, value in model_state.items() if is_adapter_tensor(key)}
    return model_state, optim_state


def _attempt(target: Path, fn, *args) -> str | None:
    """``fn(*args)``; an I/O failure becomes its one-line message (None: it worked; other errors propagate)."""
    try:
        fn(*args)
    except (Exception, dcp.CheckpointException) as err:  # NOTE: DCP's exception is a BaseException
        if not (any(isinstance(e, OSError) for e in _causes(err)) or _disk_full(err, target.parent)):
            raise
        return write_failure(err, target)
    return None


def write_failure(err: BaseException, target: Path) -> str:
    """One line for an I/O failure while writing checkpoint ``target``: where, why, and what is left."""
    previous = [path for step, path in list_checkpoints(target.parent) if path != target]
    kept = f"the previous checkpoint is intact: {previous[-1]}" if previous else "no earlier checkpoint exists"
    if _disk_full(err, target.parent):
        return f"no space left on device while writing {target}; {kept}"
    reason = next((e.strerror for e in _causes(err) if isinstance(e, OSError) and e.strerror), str(err).splitlines()[0])
    return f"could not write {target}: {reason}; {kept}"


def _disk_full(err: BaseException, directory: Path) -> bool:
    """Whether ``err``, raised while writing into ``directory``, means the disk (or quota) is full.

    NOTE: torch's zip writer (DCP's non-tensor items, torch.save) reports a short write as
    "unexpected pos N vs M", without an errno: then the file system's free space settles it.
    """
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(err)):
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the per-rank failures a DCP CheckpointException holds."""
    stack, seen = [err], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():  # NOTE: {rank: (exception, traceback)}
            stack.append(failure[0] if isinstance(failure, tuple) else failure)


def prune_checkpoints(checkpoint_dir: Path, step: int, run_id: str, keep_last_n: int | None) -> None:
    """Keep ``keep_last_n`` checkpoints of run ``run_id`` up to ``step``: delete the older ones.

    NOTE: only checkpoints that this run wrote before ``step`` can go; another run's, a newer
    one, or one whose train state cannot be read are never deleted."""
    if keep_last_n is None:
        return
    ours = [path for s, path in list_checkpoints(checkpoint_dir) if s < step and (read_train_state(path) or {}).get("run_id") == run_id]
    for path in ours[: max(len(ours) - (keep_last_n - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(checkpoint_dir: Path) -> list[Path]:
    """Delete temporary directories left by a run killed while saving; returns what was removed."""
    leftovers = sorted(checkpoint_dir.glob(".step_*")) if checkpoint_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


# ----- resuming -----------------------------------------------------------------------------------
# Recipe keys a resume must keep: they decide the model's shape, the vocabulary and the data order.
RESUME_KEYS = (
    "model._target_", "model.pretrained_model_name_or_path", "model.config", "tokenizer", "dataset",
    "step_scheduler.global_batch_size", "dataloader.shuffle", "rng.seed", "peft",
)
_PATH_KEYS = ("pretrained_model_name_or_path", "path_or_dataset")


def _leaves(value, prefix: str) -> dict[str, object]:
    """{dotted key: value} of every non-mapping leaf under ``prefix``; local paths made absolute."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    if prefix.endswith(_PATH_KEYS) and isinstance(value, str) and Path(value).exists():
        value = str(Path(value).resolve())
    return {prefix: value}


def config_differences(saved: dict, current: dict) -> list[str]:
    """"key: A in the checkpoint, B now" for each leaf under ``RESUME_KEYS`` that differs."""
    def lookup(config: dict, dotted: str):
        for part in dotted.split("."):
            config = config.get(part) if isinstance(config, dict) else None
        return config

    differences = []
    for key in RESUME_KEYS:
        old, new = _leaves(lookup(saved, key), key), _leaves(lookup(current, key), key)
        for leaf in sorted(old.keys() | new.keys()):
            if old.get(leaf) != new.get(leaf):
                differences.append(f"{leaf}: {old.get(leaf)!r} in the checkpoint, {new.get(leaf)!r} now")
    return differences


def shape_differences(path: Path, model_state: dict) -> list[str]:
    """This model's tensors that the checkpoint lacks or holds with another shape, by name."""
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    differences = []
    for name, tensor in model_state.items():
        meta = saved.get(f"model.{name}")
        if meta is None:
            differences.append(f"tensor {name} is not in the checkpoint")
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(tensor.shape):
            differences.append(f"tensor {name} is {list(meta.size)} in the checkpoint, {list(tensor.shape)} in this model")
    return differences


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, config: dict) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns its train state.

    ``config`` (the resolved recipe, as a dict) must agree with the checkpoint's on ``RESUME_KEYS``
    and the model's tensors with the saved shapes; else a RunStopped saying what differs."""
    model_state, optim_state = training_state(model, optimizer)
    differences = config_differences(yaml.safe_load((path / CONFIG).read_text()), config)
    differences += shape_differences(path, model_state)[:3]
    if differences:
        raise RunStopped(
            f"cannot resume from {path}: {'; '.join(differences)}. Resume with the recipe it was written with, "
            "or start a new run (--overwrite, or another --output_dir)",
            EXIT_BAD_INPUT,
        )
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=state_options(model)
    )
    rng_file = path / f"rng_rank{runtime.rank}.pt"
    if not rng_file.is_file():  # resumed on more ranks than saved: rank 0's generators
        rng_file = path / "rng_rank0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_train_state(path)
