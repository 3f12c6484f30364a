"""Load an HF checkpoint directory into a model, and save a model as one.

Loading builds nothing itself: the caller builds the model on the meta device, then tensors are
streamed in one at a time (read, cast to the parameter's dtype, placed), so the checkpoint is never
in memory twice. Every mismatch is reported with the key, the file and what was expected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig

from . import hf_adapter
from .hf_adapter import CheckpointError
from .safetensors_io import AtomicDirectory, CheckpointFiles, write_safetensors

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("ernie4_5", "ernie4_5_moe")


def load_config(path: str | Path):
    """The transformers config of an ERNIE 4.5 checkpoint directory, with clear errors."""
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(
            f"{path} is a file, not a checkpoint directory; pass the directory that holds it ({path.parent})"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {path}: expected an HF checkpoint directory "
            "(config.json + model.safetensors or model.safetensors.index.json)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_file} has model_type={model_type!r}; ernie45 loads ERNIE 4.5 checkpoints "
            f"({' or '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return AutoConfig.from_pretrained(str(path))


def checkpoint_dtype(files: CheckpointFiles) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (read from the embedding's header)."""
    return files.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in files else torch.float32


def native_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; a tied lm_head appears once (as the embedding)."""
    tensors = dict(model.named_parameters())
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    tensors.update({name: b for name, b in model.named_buffers() if name not in non_persistent})
    return tensors


def _check_key_sets(files: CheckpointFiles, expected: set[str], tied: bool) -> None:
    present = set(files.keys())
    skipped = sorted(k for k in present if hf_adapter.is_skipped(k))
    if skipped:
        logger.info("skipping %d multi-token-prediction tensors (model.mtp_*) not used by this model", len(skipped))
    unexpected = sorted(present - expected - set(skipped) - ({"lm_head.weight"} if tied else set()))
    if unexpected:
        shown = ", ".join(f"{k} ({files.file_of(k).name})" for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"unexpected tensor(s) in {files.directory} that the model has no place for: {shown}{more}; "
            "check that config.json matches the weights (layers, experts, use_bias, tie_word_embeddings)"
        )
    missing = sorted(expected - present)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"tensor(s) missing from the checkpoint in {files.directory}: {', '.join(missing[:5])}{more}"
        )


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` by ``value`` (keeps requires_grad)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def load_hf_weights(model: nn.Module, files: CheckpointFiles, device: torch.device | str = "cpu") -> None:
    """Stream every tensor of ``model`` (typically on meta) in from ``files``, casting to its dtype."""
    targets = native_tensors(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    expected = {key for name, t in targets.items() for key in hf_adapter.hf_keys(name, tuple(t.shape))}
    _check_key_sets(files, expected, tied)
    for name, target in targets.items():
        value = hf_adapter.read_native(files, name, tuple(target.shape), dtype=target.dtype, device=device)
        set_tensor(model, name, value)
    files.close()


def hf_state_items(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs in HF layout for the whole model (views, no copies)."""
    return [pair for name, t in native_tensors(model).items() for pair in hf_adapter.to_hf(name, t.detach())]


def save_hf_checkpoint(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json (+ generation_config.json) and safetensors in the HF layout, atomically."""
    config = model.config
    config.dtype = model.get_input_embeddings().weight.dtype
    with AtomicDirectory(path) as tmp:
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        write_safetensors(tmp, hf_state_items(model), max_shard_size)
