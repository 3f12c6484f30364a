"""Reading and writing HF-format safetensors checkpoints, one tensor at a time.

Reading never holds more than the tensor being loaded: files are opened lazily with
``safe_open`` and tensors (or slices of them) are read on demand. Writing goes to a temporary
directory beside the target, which is renamed into place only when every file is complete, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointFiles:
    """The tensors of a checkpoint directory (single file or sharded with an index), by HF key."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: self.directory / name for key, name in weight_map.items()}
            for path in set(self._file_of.values()):
                if not path.is_file():
                    raise FileNotFoundError(f"{index} names shard {path.name}, which is missing from {self.directory}")
        elif single.is_file():
            self._file_of = {key: single for key in _header_keys(single)}
        else:
            found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            hint = " (PyTorch .bin checkpoints are not supported; convert them to safetensors)" if any(
                name.endswith(".bin") for name in found
            ) else ""
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}{hint}; found: {found[:10]}"
            )
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def _header(self, key: str) -> dict:
        path = self._file_of[key]
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        return self._headers[path][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._header(key)["dtype"]]

    def _handle(self, key: str):
        path = self._file_of[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_slice(self, key: str, index: tuple) -> torch.Tensor:
        """Read only ``tensor[index]`` from disk (index: a tuple of slices)."""
        return self._handle(key).get_slice(key)[index]

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """``out[:] = tensor[start : start + len(out)]`` (rows of dim 0), read straight from disk.

        When ``out`` is a contiguous CPU tensor of the stored dtype the bytes land in it directly
        (no memory map, no temporary), so a rank loading its shard of a model holds only that.
        """
        header = self._header(key)
        stored = header["shape"]
        if list(out.shape[1:]) != stored[1:] or start + out.shape[0] > stored[0]:
            raise ValueError(f"rows {start}..{start + out.shape[0]} of shape {list(out.shape)} do not fit {key} {stored}")
        if out.device.type != "cpu" or not out.is_contiguous() or out.dtype != _DTYPES[header["dtype"]]:
            out.copy_(self.get_slice(key, (slice(start, start + out.shape[0]),)))
            return
        path = self._file_of[key]
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(_data_start(path) + header["data_offsets"][0] + start * row_bytes)
            while view.nbytes:
                read = f.readinto(view)
                if not read:
                    raise EOFError(f"{path} ends inside tensor {key}")
                view = view[read:]

    def close(self) -> None:
        self._handles.clear()


def _data_start(path: Path) -> int:
    """Byte offset of the tensor data: the 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _header_keys(path: Path) -> list[str]:
    return list(_read_header(path))


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB', '200MB' or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of (key, nbytes) in order into shards of at most ``max_shard_bytes``."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


class AtomicDirectory:
    """``with AtomicDirectory(path) as tmp:`` write into tmp; on success tmp replaces path."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for path in self.tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_safetensors(
    directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int | str
) -> None:
    """Write (key, tensor) pairs as HF does: one file, or numbered shards plus an index."""
    named = [(key, tensor.detach()) for key, tensor in tensors]
    sizes = [(key, t.numel() * t.element_size()) for key, t in named]
    write_safetensors_stream(directory, sizes, named, max_shard_size)


def write_safetensors_stream(
    directory: Path,
    sizes: list[tuple[str, int]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_size: int | str,
) -> None:
    """``write_safetensors`` for tensors that arrive one at a time (e.g. gathered from other ranks)
    in the order of ``sizes`` ((key, nbytes), known up front): holds at most one shard in memory."""
    shards = plan_shards(sizes, parse_size(max_shard_size))
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)]
    stream = iter(tensors)
    weight_map = {}
    for name, keys in zip(names, shards):
        shard = {}
        for key in keys:
            arrived, tensor = next(stream)
            if arrived != key:
                raise ValueError(f"tensor {arrived!r} arrived where the shard plan expects {key!r}")
            shard[key] = tensor.detach()
        _save(directory / name, shard)
        weight_map.update({key: name for key in keys})
    if len(shards) == 1:
        return
    total = sum(nbytes for _, nbytes in sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # NOTE: safetensors refuses tensors that share storage; cloning here costs one shard at most.
    seen: set[int] = set()
    ready = {}
    for key, tensor in tensors.items():
        tensor = tensor.cpu()
        ptr = tensor.untyped_storage().data_ptr()
        shared = ptr in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        ready[key] = tensor.clone() if shared or not tensor.is_contiguous() else tensor
        seen.add(ptr)
    save_file(ready, str(path), metadata={"format": "pt"})


def iter_tensors(files: CheckpointFiles) -> Iterator[tuple[str, torch.Tensor]]:
    for key in files.keys():
        yield key, files.get(key)
