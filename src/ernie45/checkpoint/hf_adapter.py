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

import torch

from .safetensors_io import CheckpointFiles

_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
# Release checkpoints carry multi-token-prediction weights that these models do not use.
SKIPPED_PREFIXES = ("model.mtp_",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the key, the file and what was expected."""


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


def _check_shape(files: CheckpointFiles, key: str, expected: tuple[int, ...], what: str) -> None:
    found = files.shape(key)
    if found != tuple(expected):
        raise CheckpointError(
            f"shape mismatch for {key} in {files.file_of(key)}: {what} expects {list(expected)}, "
            f"the checkpoint has {list(found)} (is config.json the one this checkpoint was saved with?)"
        )


def _require(files: CheckpointFiles, key: str, what: str) -> None:
    if key not in files:
        raise CheckpointError(f"{what}: tensor {key} is missing from the checkpoint in {files.directory}")


def read_native(
    files: CheckpointFiles,
    native_key: str,
    native_shape: tuple[int, ...],
    index: tuple[slice, ...] | None = None,
) -> torch.Tensor:
    """Read ``native[index]`` (index: slices per dim; None = whole) straight from the files."""
    index = tuple(index or ())
    match = _EXPERTS.match(native_key)
    if not match:
        _require(files, native_key, "the model")
        _check_shape(files, native_key, native_shape, "the model")
        return files.get_slice(native_key, index) if index else files.get(native_key)
    experts = range(native_shape[0])[index[0] if index else slice(None)]
    rest = index[1:]
    per_expert = []
    for expert in experts:
        parts = [files.get(key) for key in _expert_parts(files, match, native_shape, expert)]
        per_expert.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
    stacked = torch.stack(per_expert) if per_expert else torch.empty(0, *native_shape[1:])
    return stacked[(slice(None), *rest)] if rest else stacked


def _expert_parts(files: CheckpointFiles, match: re.Match, native_shape: tuple[int, ...], expert: int) -> list[str]:
    """The checked HF keys whose rows, stacked, make ``native[expert]``."""
    keys = hf_expert_keys(match["prefix"], match["kind"], expert)
    layer = match["prefix"].split(".")[2]
    for key in keys:
        _require(files, key, f"layer {layer} expert {expert}")
        _check_shape(files, key, (native_shape[1] // len(keys), native_shape[2]), f"layer {layer} expert {expert}")
    return keys


def read_native_into(
    files: CheckpointFiles,
    native_key: str,
    native_shape: tuple[int, ...],
    out: torch.Tensor,
    index: tuple[slice, ...] | None = None,
) -> None:
    """``out.copy_(read_native(files, native_key, native_shape, index))`` without temporaries when
    ``index`` narrows only the first dim (how FSDP2 and expert parallelism shard): the rows are
    read from the files straight into ``out``."""
    index = tuple(index or ())
    full_rest = all(s == slice(0, n) for s, n in zip(index[1:], native_shape[1:]))
    if not full_rest:
        out.copy_(read_native(files, native_key, native_shape, index))
        return
    rows = range(native_shape[0])[index[0] if index else slice(None)]
    match = _EXPERTS.match(native_key)
    if not match:
        _require(files, native_key, "the model")
        _check_shape(files, native_key, native_shape, "the model")
        files.read_rows_into(native_key, out, rows.start if len(rows) else 0)
        return
    for local, expert in enumerate(rows):
        keys = _expert_parts(files, match, native_shape, expert)
        height = native_shape[1] // len(keys)
        for part, key in enumerate(keys):
            files.read_rows_into(key, out[local, part * height : (part + 1) * height])


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
