"""Reading and writing HF-format safetensors checkpoints, one tensor at a time.

Reading never holds more than the tensor being loaded: each file is memory-mapped once (privately:
pages are read on first touch) and tensors (or slices of them) are views of it. Every file's
header is checked against the file's size when the checkpoint is opened, so a truncated or
corrupt file is one ``CheckpointError`` naming it, not an error from deep inside safetensors.
Tensors that were copied out (cast, stacked) give their pages back when loading ends, so a few
views (fp32 router weights in a bf16 file) do not keep the whole file resident.
Writing streams tensors into shard files (``write_safetensors_stream``) that ``staging.StagedSave``
puts in place.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..host_memory import LINUX_LIBC

if TYPE_CHECKING:
    from .staging import StagedSave

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # NOTE: safetensors' own limit, checked before the header is read

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model: names the file, the key and what was expected."""


def json_object(data: bytes, source: str | os.PathLike) -> dict:
    """``data`` parsed as a JSON object, else a CheckpointError naming ``source`` and what is wrong."""
    if not data.strip():
        raise CheckpointError(f"{source} is empty")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # NOTE: JSONDecodeError and bad UTF-8 are ValueErrors
        raise CheckpointError(f"{source} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{source} holds {_JSON_TYPES.get(type(value), type(value).__name__)}, not a JSON object")
    return value


class CheckpointFiles:
    """The tensors of a checkpoint directory (single file or sharded with an index), by HF key."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            self._file_of = {key: _shard_path(index, key, name) for key, name in _weight_map(index).items()}
            for path in set(self._file_of.values()):
                if not path.is_file():
                    raise FileNotFoundError(f"{index} names shard {path.name}, which is missing from {self.directory}")
        elif single.is_file():
            self._file_of = dict.fromkeys(_read_header(single), single)
        else:
            found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            hint = (
                " (PyTorch .bin checkpoints are not read: pickles can run code; convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR))"
            ) if any(
                name.endswith(".bin") for name in found
            ) else ""
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}{hint}; found: {found[:10]}"
            )
        # NOTE: every header is read and checked now (a few KB each), so a damaged shard is named
        # before any weight is loaded rather than halfway through (or by safetensors' own error).
        self._headers = {path: _read_header(path) for path in set(self._file_of.values())}
        for key, path in self._file_of.items():
            if key not in self._headers[path]:
                raise CheckpointError(f"{index} places {key} in {path.name}, but that file does not hold it")
        self._maps: dict[Path, torch.UntypedStorage] = {}
        self._data_starts: dict[Path, int] = {}
        self._copied: dict[Path, list[tuple[int, int]]] = {}  # byte ranges to give back on close()

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def _header(self, key: str) -> dict:
        return self._headers[self._file_of[key]][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._header(key)["dtype"]]

    def _mapped(self, key: str) -> torch.UntypedStorage:
        """The bytes of ``key``: a slice of its file's private memory map (mapped once per file; pages
        are read on first touch, and writing to a tensor never reaches the file)."""
        path = self._file_of[key]
        if path not in self._maps:
            try:
                self._maps[path] = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
            except (OSError, RuntimeError) as err:
                raise CheckpointError(f"{path} could not be memory-mapped: {err}") from None
            self._data_starts[path] = _data_start(path)
        begin, end = self._byte_range(key)
        return self._maps[path][begin:end]

    def _byte_range(self, key: str) -> tuple[int, int]:
        """Where ``key``'s bytes are in its (mapped) file: [begin, end)."""
        begin, end = self._header(key)["data_offsets"]
        start = self._data_starts[self._file_of[key]]
        return start + begin, start + end

    def _view(self, key: str) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype(key)).set_(self._mapped(key), 0, self.shape(key))

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, a view of the memory-mapped file (its own storage, as safetensors gives)."""
        return self._view(key)

    def get_slice(self, key: str, index: tuple) -> torch.Tensor:
        """``tensor[index]`` (index: a tuple of slices), a view: only its pages are ever read."""
        return self._view(key)[index]

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
            self.copied(key)
            return
        path = self._file_of[key]
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(_data_start(path) + header["data_offsets"][0] + start * row_bytes)
            while view.nbytes:
                read = f.readinto(view)
                if not read:
                    raise CheckpointError(f"{path} ends inside tensor {key} (was it truncated after it was opened?)")
                view = view[read:]

    def copied(self, key: str) -> None:
        """``key``'s bytes were copied out of the map and no view of them is kept: close() gives its
        pages back. NOTE: never for a key a kept view reads (a write to that view would be lost)."""
        path = self._file_of[key]
        if path in self._maps:
            self._copied.setdefault(path, []).append(self._byte_range(key))

    def close(self) -> None:
        """Forget the maps; tensors still viewing one keep it alive, holding only their own pages."""
        for path, ranges in self._copied.items():
            _release_pages(self._maps[path], ranges)
        self._copied.clear()
        self._maps.clear()


def _release_pages(storage: torch.UntypedStorage, ranges: list[tuple[int, int]]) -> None:
    """Drop the whole pages inside ``ranges`` (byte offsets, non-overlapping) of a private file map
    from this process (Linux ``MADV_DONTNEED``: the next touch would read the file again).

    Copying a tensor out of the map makes its pages resident, and one kept view keeps the whole
    map; without this, a bf16 file loaded into fp32 with its fp32 router weights as views keeps
    every byte of the file in RSS (0.73 GiB for the benchmarks' mini-MoE). Adjacent ranges are
    merged, so a page two copied tensors share goes too; a page shared with a view stays."""
    if LINUX_LIBC is None:
        return
    page, base = mmap.PAGESIZE, storage.data_ptr()
    merged: list[list[int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    for begin, end in merged:
        first, stop = -(-begin // page) * page, end // page * page
        if first < stop:
            LINUX_LIBC.madvise(ctypes.c_void_p(base + first), ctypes.c_size_t(stop - first), mmap.MADV_DONTNEED)


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file name), checked."""
    weight_map = json_object(index.read_bytes(), index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index} has no "weight_map" (an object mapping each tensor name to its shard file)')
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{index} maps {key} to {name!r}, which is not a file name")
    return weight_map


def _shard_path(index: Path, key: str, name: str) -> Path:
    """The shard ``name`` inside the index's directory; a name that leaves it is refused.

    NOTE: checked on the name, not on the resolved path: the hub cache links shards to blobs
    elsewhere, and those links are fine; ``../x`` or ``/etc/x`` written in an index is not.
    """
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == os.curdir or normal.split(os.sep)[0] == os.pardir:
        raise CheckpointError(
            f"{index} maps {key} to {name!r}, which is not a file inside {index.parent}; refusing to read it"
        )
    return index.parent / normal


def _data_start(path: Path) -> int:
    """Byte offset of the tensor data: the 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _read_header(path: Path) -> dict:
    """The tensor entries of a safetensors file's header, each checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {length} bytes "
                f"but the file has {size} (and safetensors allows at most {MAX_HEADER_BYTES})"
            )
        header = json_object(f.read(length), f"the header of {path}")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        _check_entry(path, key, entry, size - 8 - length)
    _check_coverage(path, header, size - 8 - length)
    return header


def _check_coverage(path: Path, header: dict, data_bytes: int) -> None:
    """The tensors tile the data section exactly, as safetensors requires: no gap, no overlap, no
    trailing bytes (what an interrupted or appended-to write leaves)."""
    covered = 0
    for begin, end in sorted(entry["data_offsets"] for entry in header.values()):
        if begin != covered:
            raise CheckpointError(
                f"{path} is not a readable safetensors file: its tensors' data_offsets "
                f"{'overlap' if begin < covered else 'leave a gap'} at byte {min(begin, covered)} of the data"
            )
        covered = end
    if covered != data_bytes:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: its tensors cover {covered} bytes of its "
            f"{data_bytes}-byte data section (trailing bytes?)"
        )


def _check_entry(path: Path, key: str, entry, data_bytes: int) -> None:
    """One header entry: a known dtype, a shape, and data offsets that match it and lie inside the file."""
    try:
        dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        ints = [*shape, begin, end]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: the header entry of {key} is malformed ({str(entry)[:120]}); "
            "expected a known dtype, a shape and two data_offsets"
        ) from None
    if not all(type(n) is int and n >= 0 for n in ints):
        raise CheckpointError(f"{path}: {key} has a shape {shape} or data_offsets {[begin, end]} that are not sizes")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: {key} of shape {shape} ({entry['dtype']}) needs {nbytes} bytes, its data_offsets give {end - begin}"
        )
    if end > data_bytes:
        raise CheckpointError(
            f"{path}: the data of {key} (bytes {begin}..{end}) runs past the end of the file "
            f"({data_bytes} data bytes); the file is truncated"
        )


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


def fresh_directory(parent: Path, prefix: str) -> Path:
    """A new empty directory ``parent/prefix<random>``, created with the process umask.

    NOTE: not ``tempfile.mkdtemp``, which creates it 0700: a checkpoint renamed from there would
    stay unreadable to everyone else, unlike the 0755-style folders transformers writes.
    """
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


class AtomicDirectory:
    """``with AtomicDirectory(path) as tmp:`` write into tmp; on success tmp replaces path."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = fresh_directory(self.target.parent, f".{self.target.name}.tmp-")
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


def shard_names(count: int) -> list[str]:
    """The file names of a checkpoint in ``count`` shards, as transformers names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def write_safetensors_stream(
    staged: StagedSave,
    sizes: list[tuple[str, int]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_size: int | str,
) -> None:
    """Write (key, tensor) pairs as HF does (one file, or numbered shards plus an index) into
    ``staged``. They may arrive one at a time (e.g. gathered from other ranks) in the order of
    ``sizes`` ((key, nbytes), known up front): at most one shard is held in memory."""
    shards = plan_shards(sizes, parse_size(max_shard_size))
    stream = iter(tensors)
    weight_map = {}
    for name, keys in zip(shard_names(len(shards)), shards):
        shard = {}
        for key in keys:
            arrived, tensor = next(stream)
            if arrived != key:
                raise ValueError(f"tensor {arrived!r} arrived where the shard plan expects {key!r}")
            shard[key] = tensor.detach()
        with staged.file(name) as path:
            _save(path, shard)
        weight_map.update({key: name for key in keys})
    if len(shards) == 1:
        return
    total = sum(nbytes for _, nbytes in sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with staged.file(INDEX_FILE) as path:
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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

