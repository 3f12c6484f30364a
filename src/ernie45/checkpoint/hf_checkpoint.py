"""Load an HF checkpoint directory into a model, and save a model as one.

Loading builds nothing itself: the caller builds the model on the meta device, then tensors are
streamed in one at a time (read, cast to the parameter's dtype, placed), so the checkpoint is never
in memory twice. Every mismatch is reported with the key, the file and what was expected.
Saving streams tensors into shard files the same way; a parallelised model's tensors are gathered
onto rank 0 one at a time first, so one ``save_pretrained`` serves both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, GenerationConfig

from ..models.validation import check_model_config
from ..sharding import is_dtensor, local_index, local_part
from . import hf_adapter
from .gather import all_stage_tensors, failure_from_rank0, gather_on_rank0, is_parallel
from .safetensors_io import CheckpointError, CheckpointFiles, json_object, write_safetensors_stream
from .staging import CONFIG_FILE, GENERATION_CONFIG_FILE, StagedSave

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
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {path}: expected an HF checkpoint directory "
            "(config.json + model.safetensors or model.safetensors.index.json)"
        )
    model_type = json_object(config_file.read_bytes(), config_file).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_file} has model_type={model_type!r}; ernie45 loads ERNIE 4.5 checkpoints "
            f"({' or '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (StrictDataclassError, ValueError, TypeError, KeyError) as err:
        # NOTE: transformers checks each field's type ("Validation error for field 'hidden_size':
        # ... expected int, got str"); its message names the key, on two lines: made one here.
        raise CheckpointError(f"{config_file} is not a valid {model_type} config: {' '.join(str(err).split())}") from None
    try:
        check_model_config(config)  # NOTE: values transformers accepts but no model can have (0 heads, -8 wide)
    except ValueError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    return config


def embedding_key(files: CheckpointFiles) -> str:
    """Where the checkpoint keeps the input embedding: ``model.embed_tokens.weight``, or, in a tied
    checkpoint written with only the head's name (safetensors' de-duplication of shared tensors keeps
    one name), ``lm_head.weight``, which transformers then loads into both as well."""
    if "model.embed_tokens.weight" not in files and "lm_head.weight" in files:
        return "lm_head.weight"
    return "model.embed_tokens.weight"


def checkpoint_dtype(files: CheckpointFiles) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (read from the embedding's header)."""
    key = embedding_key(files)
    return files.dtype(key) if key in files else torch.float32


def is_adapter_tensor(name: str) -> bool:
    """A LoRA adapter tensor (``ernie45.peft``): ``...lora_A.weight`` of a linear layer, or the
    routed experts' ``{gate_up,down}_proj_lora_{A,B}``. Not part of a base checkpoint."""
    return name.endswith(("lora_A.weight", "lora_B.weight", "_lora_A", "_lora_B"))


def native_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; a tied lm_head appears once (as the embedding).
    LoRA adapter tensors are left out: they live in adapter files (``ernie45.peft.save_adapter``)."""
    tensors = {name: p for name, p in model.named_parameters() if not is_adapter_tensor(name)}
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    tensors.update({name: b for name, b in model.named_buffers() if name not in non_persistent})
    return tensors


def _check_key_sets(
    files: CheckpointFiles, expected: set[str], tied: bool, *elsewhere: Callable[[str], bool] | None
) -> None:
    """Every expected key present, and no key the model has no place for (``elsewhere``: keys that
    the caller leaves out, or that another pipeline stage holds, not this model part)."""
    skips = [skip for skip in elsewhere if skip is not None]
    present = {key for key in files.keys() if key in expected or not any(skip(key) for skip in skips)}
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


def load_hf_weights(
    model: nn.Module,
    files: CheckpointFiles,
    device: torch.device | str = "cpu",
    unused: Callable[[str], bool] | None = None,
) -> None:
    """Fill every tensor of ``model`` from ``files``, cast to its dtype (``unused``: HF keys the caller
    chose not to load, e.g. the layers beyond a smaller ``num_hidden_layers``).

    A tensor on the meta device is replaced by the value read (plain tensors stay views of the
    memory-mapped file where dtype and device allow); an allocated one (a parallel layout's
    shard) gets its own slice of the global tensor copied in place.
    """
    targets = native_tensors(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    embedding = embedding_key(files)
    sources = {name: checkpoint_name(name, tied, embedding) for name in targets}
    expected = {key for name, t in targets.items() for key in hf_adapter.hf_keys(sources[name], tuple(t.shape))}
    pipeline = getattr(model, "pipeline", None)
    _check_key_sets(files, expected, tied, unused, pipeline.held_elsewhere if pipeline is not None else None)
    for name, target in targets.items():
        shape, source = tuple(target.shape), sources[name]
        if target.is_meta:
            set_tensor(model, name, hf_adapter.read_native(files, source, shape, dtype=target.dtype, device=device))
        else:
            with torch.no_grad():
                hf_adapter.read_native_into(files, source, shape, local_part(target), local_index(target))
    files.close()


def checkpoint_name(name: str, tied: bool, embedding: str = "model.embed_tokens.weight") -> str:
    """The checkpoint tensor that fills ``name``: in a tied model the embedding and the LM head (also
    one held without its embedding, on a pipeline's last stage) read the one tensor a tied checkpoint
    stores, under ``embedding`` (see ``embedding_key``)."""
    return embedding if tied and name in ("lm_head.weight", "model.embed_tokens.weight") else name


def hf_sizes(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(HF key, bytes) of every tensor the checkpoint will hold, from global shapes (no data)."""
    sizes = []
    for name, tensor in tensors.items():
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        sizes += [(key, part.numel() * part.element_size()) for key, part in hf_adapter.to_hf(name, meta)]
    return sizes


def hf_items(
    tensors: dict[str, torch.Tensor], gather: bool, replicated: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, whole tensor) in checkpoint order. With ``gather`` it is collective: each tensor is
    gathered onto rank 0 when its turn comes, the other ranks get nothing, and all must exhaust it
    (``replicated=False``: plain tensors too, as pipeline stages hold different ones)."""
    for name, tensor in tensors.items():
        whole = gather_on_rank0(tensor, replicated) if gather else tensor.detach()
        if whole is None:
            continue
        gathered = gather and (is_dtensor(tensor) or not replicated)
        for key, part in hf_adapter.to_hf(name, whole.cpu() if gathered else whole):
            # NOTE: a gathered tensor is a temporary: a view of one expert would keep the whole
            # layer alive until its shard file is written; a copy of just the part lets it go now.
            yield key, part.clone() if gathered and part.untyped_storage().nbytes() != part.nbytes else part


def save_hf_checkpoint(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, generation_config.json and the weights of ``model`` into ``path`` as
    transformers lays them out, replacing only those files: a tokenizer or README there stays.

    Collective for a parallelised model (one holding DTensors, or some pipeline stages): every
    rank calls it, rank 0 writes the files a single-process save writes, and an error there (disk
    full) is raised on every rank.
    """
    if any(is_adapter_tensor(name) for name, _ in model.named_parameters()):
        raise ValueError(
            "this model holds LoRA adapters: save them with ernie45.peft.save_adapter(model, dir), or fold "
            "them into the weights first with ernie45.peft.merge(model) and then save_pretrained"
        )
    tensors = native_tensors(model)
    pipeline = getattr(model, "pipeline", None)
    if pipeline is None and not is_parallel(tensors):
        _write_checkpoint(model, Path(path), hf_sizes(tensors), hf_items(tensors, gather=False), max_shard_size)
        return
    if pipeline is not None:
        tensors = all_stage_tensors(model, tensors)
    items = hf_items(tensors, gather=True, replicated=pipeline is None)
    failure = None
    if dist.get_rank() == 0:
        try:
            _write_checkpoint(model, Path(path), hf_sizes(tensors), items, max_shard_size)
        except Exception as err:
            failure = err
    for _ in items:  # every rank takes part in each gather; on rank 0, in those a failure left
        pass
    failure = failure_from_rank0(failure)
    if failure is not None:
        raise failure


def _write_checkpoint(
    model: nn.Module,
    path: Path,
    sizes: list[tuple[str, int]],
    items: Iterator[tuple[str, torch.Tensor]],
    max_shard_size: int | str,
) -> None:
    """The configs, then the weights, staged beside ``path``'s files and put in place (``StagedSave``)."""
    config = model.config
    config.dtype = model.get_input_embeddings().weight.dtype
    with StagedSave(path) as staged:
        # NOTE: the configs are staged first: transformers validates them as it writes, and a
        # config it refuses should fail the save before the weights are written, not after.
        with staged.file(CONFIG_FILE) as file:
            config.save_pretrained(str(file.parent))
        with staged.file(GENERATION_CONFIG_FILE) as file:
            GenerationConfig.from_model_config(config).save_pretrained(str(file.parent))
        write_safetensors_stream(staged, sizes, items, max_shard_size)
