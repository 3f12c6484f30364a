"""Mapping between our parameter names/layouts and the HF ("-PT") checkpoint layout.

Every tensor that is the same tensor in both worlds has the same name, so the mapping is the
identity except for routed experts: HF stores one (gate, up, down) triple per expert, we store
each layer's experts grouped as 3-D tensors for grouped GEMMs::

    model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, H]  <->  experts.{e}.gate_proj.weight [I,H]
                                                               experts.{e}.up_proj.weight   [I,H]
    model.layers.{i}.mlp.experts.down_proj    [E, H, I]   <->  experts.{e}.down_proj.weight [H,I]

Conversion works one native tensor (one layer's experts) at a time, so a 300B checkpoint never
has to be in host memory at once, and a rank that owns experts [e0, e1) reads only those.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..host_memory import empty_in_huge_pages
from .safetensors_io import CheckpointError, CheckpointFiles

_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
# Release checkpoints carry multi-token-prediction weights that these models do not use.
SKIPPED_PREFIXES = ("model.mtp_",)


def is_skipped(hf_key: str) -> bool:
    return hf_key.startswith(SKIPPED_PREFIXES)


def hf_expert_keys(prefix: str, kind: str, expert: int) -> list[str]:
    names = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{expert}.{name}.weight" for name in names]


def hf_keys(native_key: str, native_shape: tuple[int, ...]) -> list[str]:
    """The HF keys that together make up one native tensor."""
    match = _EXPERTS.match(native_key)
    if not match:
        return [native_key]
    return [
        key
        for expert in range(native_shape[0])
        for key in hf_expert_keys(match["prefix"], match["kind"], expert)
    ]


def _check(files: CheckpointFiles, key: str, expected: tuple[int, ...], what: str) -> None:
    """Raise a CheckpointError naming ``key`` if it is missing or not of shape ``expected``."""
    if key not in files:
        raise CheckpointError(f"{what}: tensor {key} is missing from the checkpoint in {files.directory}")
    found = files.shape(key)
    if found != tuple(expected):
        raise CheckpointError(
            f"shape mismatch for {key} in {files.file_of(key)}: {what} expects {list(expected)}, "
            f"the checkpoint has {list(found)} (is config.json the one this checkpoint was saved with?)"
        )


def _full_index(native_shape: tuple[int, ...], index: tuple[slice, ...] | None) -> tuple[slice, ...]:
    """``index`` (step-1 slices, None = whole) as one ``slice(start, stop)`` per dim of the tensor."""
    index = tuple(index or ())
    index += (slice(None),) * (len(native_shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, native_shape))


def read_native(
    files: CheckpointFiles,
    native_key: str,
    native_shape: tuple[int, ...],
    index: tuple[slice, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``native[index]`` (index: slices per dim; None = whole) as ``dtype`` (None: as stored) on ``device``.

    A plain tensor stays a view of the memory-mapped file where dtype and device allow; grouped
    experts are allocated once and each expert is copied (and cast) from the map into its place.
    """
    match = _EXPERTS.match(native_key)
    if not match:
        _check(files, native_key, native_shape, "the model")
        tensor = files.get_slice(native_key, index) if index else files.get(native_key)
        if torch.device(device).type == "cpu" and dtype not in (None, tensor.dtype):
            value = empty_in_huge_pages(tuple(tensor.shape), dtype).copy_(tensor)
        else:
            value = tensor.to(device=device, dtype=dtype)
        if value.data_ptr() != tensor.data_ptr():
            files.copied(native_key)
        return value
    full = _full_index(native_shape, index)
    dtype = dtype or files.dtype(_expert_parts(files, match, native_shape, 0)[0])
    shape = tuple(max(0, s.stop - s.start) for s in full)
    cpu = torch.device(device).type == "cpu"
    out = empty_in_huge_pages(shape, dtype) if cpu else torch.empty(shape, dtype=dtype, device=device)
    _read_experts_into(files, match, native_shape, out, full, _copy_mapped)
    return out


def read_native_into(
    files: CheckpointFiles,
    native_key: str,
    native_shape: tuple[int, ...],
    out: torch.Tensor,
    index: tuple[slice, ...] | None = None,
) -> None:
    """``out[:] = native[index]`` cast to ``out``'s dtype, each byte copied once: rows are read
    straight from disk (no memory map) where ``index`` keeps whole rows, which is how FSDP2 and
    expert parallelism shard, so a rank's memory holds only its shard."""
    full = _full_index(native_shape, index)
    match = _EXPERTS.match(native_key)
    if match:
        _read_experts_into(files, match, native_shape, out, full, _copy_read)
        return
    _check(files, native_key, native_shape, "the model")
    _copy_read(files, native_key, out, full)


def _expert_parts(files: CheckpointFiles, match: re.Match, native_shape: tuple[int, ...], expert: int) -> list[str]:
    """The checked HF keys whose rows, stacked, make ``native[expert]``."""
    keys = hf_expert_keys(match["prefix"], match["kind"], expert)
    layer = match["prefix"].split(".")[2]
    for key in keys:
        _check(files, key, (native_shape[1] // len(keys), native_shape[2]), f"layer {layer} expert {expert}")
    return keys


Copy = Callable[[CheckpointFiles, str, torch.Tensor, tuple[slice, ...]], None]


def _read_experts_into(
    files: CheckpointFiles,
    match: re.Match,
    native_shape: tuple[int, ...],
    out: torch.Tensor,
    index: tuple[slice, ...],
    copy: Copy,
) -> None:
    """Fill ``out`` with ``native[index]`` expert by expert: each HF part (gate rows then up rows, or
    down) that ``index`` reaches is copied once, into its rows of ``out`` (no cat/stack temporaries)."""
    experts, rows, columns = index
    for local, expert in enumerate(range(experts.start, experts.stop)):
        keys = _expert_parts(files, match, native_shape, expert)
        height = native_shape[1] // len(keys)
        for part, key in enumerate(keys):
            first, stop = max(rows.start, part * height), min(rows.stop, (part + 1) * height)
            if first < stop:
                source = (slice(first - part * height, stop - part * height), columns)
                copy(files, key, out[local, first - rows.start : stop - rows.start], source)


def _copy_mapped(files: CheckpointFiles, key: str, out: torch.Tensor, index: tuple[slice, ...]) -> None:
    """``out[:] = files[key][index]`` from the memory map: while the file is in the page cache this
    is one plain (casting) ``copy_``, faster than a read syscall per tensor."""
    out.copy_(files.get_slice(key, index))
    files.copied(key)


def _copy_read(files: CheckpointFiles, key: str, out: torch.Tensor, index: tuple[slice, ...]) -> None:
    """``out[:] = files[key][index]``, read from disk without a memory map when ``index`` is a range
    of whole rows (else from the map)."""
    if all(s == slice(0, n) for s, n in zip(index[1:], files.shape(key)[1:])):
        files.read_rows_into(key, out, index[0].start)
    else:
        _copy_mapped(files, key, out, index)


def to_hf(native_key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split one native tensor into the HF tensors it stands for (views where possible)."""
    match = _EXPERTS.match(native_key)
    if not match:
        return [(native_key, tensor)]
    out = []
    for expert in range(tensor.shape[0]):
        keys = hf_expert_keys(match["prefix"], match["kind"], expert)
        for key, part in zip(keys, tensor[expert].chunk(len(keys), dim=0)):
            out.append((key, part))
    return out
