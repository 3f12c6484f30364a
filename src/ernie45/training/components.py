"""Building what a recipe names: tokenizer, model (laid out over the ranks), and the final HF export.

Mixed precision: the model's weights (and so the optimizer state) are always float32 "master"
copies. Compute runs in ``model.torch_dtype``: under FSDP2 its ``MixedPrecisionPolicy`` casts the
gathered weights; otherwise ``torch.autocast`` casts matmul inputs. The router, norms and RoPE
compute in fp32 either way (the model code sees to that).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from ..auto import from_pretrained
from ..checkpoint.hf_checkpoint import load_config
from ..checkpoint.hub import hub_snapshot
from ..distributed import (
    LayoutError,
    ParallelConfig,
    apply_activation_checkpointing,
    context_parallel_refusal,
    parallelize_model,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
)
from ..models.construction import is_config_field
from ..models.rope import rope_type
from ..peft import LoRALinear, has_adapters, merge, save_adapter
from ..tokenizer import train_tokenizer
from .compile import compile_blocks
from .config import ConfigError, RecipeConfig
from .data import record_texts
from .loss import FusedLinearCrossEntropy
from .runtime import Runtime, barrier

MASTER_DTYPE = torch.float32


def compute_dtype(config: RecipeConfig) -> torch.dtype:
    return getattr(torch, config.model.torch_dtype)


def autocast(config: RecipeConfig, runtime: Runtime, layout: "Layout"):
    """The autocast context for forward passes (none when FSDP2 casts, or when computing in fp32)."""
    dtype = compute_dtype(config)
    # NOTE: FSDP2 shards (and so casts) exactly when there are several data- or context-parallel ranks.
    if dtype == MASTER_DTYPE or layout.grad_average > 1:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=dtype)


def resolve_model_path(config: RecipeConfig) -> None:
    """A from_pretrained model named by a hub id (``baidu/ERNIE-4.5-0.3B-PT``) is read from its local
    snapshot: ``model.pretrained_model_name_or_path`` becomes that directory (a local one stays)."""
    path = config.model.pretrained_model_name_or_path
    if config.model.component is from_pretrained and not Path(path).is_dir():
        try:
            config.model.pretrained_model_name_or_path = str(hub_snapshot(path, f"model.pretrained_model_name_or_path={path!r}"))
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None


# ----- tokenizer -------------------------------------------------------------------------------
def build_tokenizer(config: RecipeConfig, train_records: list[dict], saved: Path, runtime: Runtime):
    """The recipe's tokenizer. A trained one is trained once, on rank 0, and saved to ``saved``:
    every rank (and a resumed run) loads that copy, so all agree on the vocabulary."""
    section = config.tokenizer
    if section.component is train_tokenizer:
        if runtime.is_main and not (saved / "tokenizer_config.json").is_file():
            texts = [text for record in train_records for text in record_texts(record)]
            section.component(texts, section.vocab_size).save_pretrained(str(saved))
        barrier(runtime)
        return AutoTokenizer.from_pretrained(str(saved))
    path = section.pretrained_model_name_or_path or config.model.pretrained_model_name_or_path
    if path is None:
        raise ConfigError("tokenizer: a from_config model needs tokenizer.pretrained_model_name_or_path or train_tokenizer")
    try:
        return section.component(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer: cannot load a tokenizer from {path!r} ({err})") from None


# ----- model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How the model is spread over the ranks: data-parallel size and this rank's place among them."""

    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1  # ranks that see the same data (tensor-parallel peers)
    cp_size: int = 1  # ranks that share each sequence (context-parallel peers), each a part of it
    cp_rank: int = 0
    pp_size: int = 1  # pipeline stages: ranks that see the same data, each running some layers
    pp_rank: int = 0
    sharded: bool = False  # FSDP2 (with EP/TP/CP): gradients are reduced inside backward

    @property
    def grad_average(self) -> int:
        """Ranks FSDP2 averages gradients over: the data-parallel ranks and, folded in, the cp ranks."""
        return self.dp_size * self.cp_size


def model_kwargs(config: RecipeConfig, hf_config) -> dict:
    """MoE training settings as the model's ``moe_overrides`` (nothing for dense models)."""
    if hf_config.model_type != "ernie4_5_moe":
        return {}
    overrides = {"gate_bias_update_factor": config.moe.bias_update_rate}
    if config.moe.aux_loss_coef is not None:
        overrides["aux_loss_coeff"] = config.moe.aux_loss_coef
    return {"moe_overrides": overrides}


def hf_config_from_recipe(config: RecipeConfig, tokenizer):
    """A transformers config from ``model.config``, sized and wired to the tokenizer."""
    fields = dict(config.model.config)
    model_type = fields.pop("model_type")
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.config: {err}") from None


def parallel_config(config: RecipeConfig, runtime: Runtime):
    """The scale-out layout of ``distributed``; checks sizes against the world and the batch."""
    section = config.distributed
    model_parallel = section.tp_size * section.cp_size * section.pp_size
    if runtime.world_size % model_parallel:
        raise ConfigError(
            f"distributed.tp_size={section.tp_size} x cp_size={section.cp_size} x pp_size={section.pp_size} "
            f"must divide the world size {runtime.world_size}"
        )
    dp_size = runtime.world_size // model_parallel
    if section.dp_size is not None and section.dp_size != dp_size:
        raise ConfigError(
            f"distributed.dp_size={section.dp_size} does not fit {runtime.world_size} ranks with "
            f"tp_size={section.tp_size}, cp_size={section.cp_size} and pp_size={section.pp_size}: "
            f"it must be {dp_size} (or leave it out)"
        )
    if section.pp_size > 1:
        check_pipeline(config)
    if section.tp_size > 1 and config.loss_fn.component is FusedLinearCrossEntropy:
        raise ConfigError(
            "loss_fn FusedLinearCrossEntropy does not support distributed.tp_size > 1 (a vocabulary-sharded "
            "head); use ernie45.training.loss.MaskedCrossEntropy"
        )
    steps = config.step_scheduler
    if steps.global_batch_size % (steps.local_batch_size * dp_size):
        raise ConfigError(
            f"step_scheduler.global_batch_size={steps.global_batch_size} must be a multiple of local_batch_size="
            f"{steps.local_batch_size} x {dp_size} data-parallel ranks = {steps.local_batch_size * dp_size}"
        )
    dtype = compute_dtype(config)
    return ParallelConfig(
        dp_shard=-1,
        tp=section.tp_size,
        cp=section.cp_size,
        ep=section.ep_size,
        param_dtype=None if dtype == MASTER_DTYPE else dtype,
        activation_checkpointing=section.activation_checkpointing,
        pp=section.pp_size,
        pp_schedule=section.pipeline.pp_schedule,
        pp_microbatch_size=section.pipeline.pp_microbatch_size,
        layers_per_stage=section.pipeline.layers_per_stage,
    )


def check_pipeline(config: RecipeConfig) -> None:
    """What pipeline stages (distributed.pp_size > 1) need from the rest of the recipe."""
    section, steps = config.distributed, config.step_scheduler
    micro = section.pipeline.pp_microbatch_size
    if steps.local_batch_size % micro:
        raise ConfigError(
            f"step_scheduler.local_batch_size={steps.local_batch_size} must be a multiple of "
            f"distributed.pipeline.pp_microbatch_size={micro}: each micro-batch is cut into pipeline micro-batches"
        )
    if section.cp_size > 1:
        raise ConfigError(f"distributed.pp_size={section.pp_size} with cp_size={section.cp_size} is not supported yet")
    if config.peft is not None:
        raise ConfigError(f"peft (LoRA) with distributed.pp_size={section.pp_size} is not supported yet; use pp_size=1")
    if not hasattr(config.loss_fn.component, "head_loss"):
        raise ConfigError(
            f"loss_fn {config.loss_fn.target} cannot run on a pipeline's last stage (it has no head_loss); with "
            f"distributed.pp_size={section.pp_size} use ernie45.training.loss.FusedLinearCrossEntropy or MaskedCrossEntropy"
        )


def check_pipeline_batch(config: RecipeConfig, model: nn.Module) -> None:
    """The pipeline schedule can run a micro-batch of local_batch_size rows (e.g. 1F1B needs at least
    as many pipeline micro-batches as stages)."""
    try:
        model.pipeline.check_batch(config.step_scheduler.local_batch_size)
    except LayoutError as err:
        raise ConfigError(f"distributed.pipeline: {err}") from None


def check_single_process_layout(config: RecipeConfig, runtime: Runtime) -> None:
    """A layout that needs several ranks is an error in one process, not silently ignored."""
    if runtime.distributed:
        return
    section = config.distributed
    for key in ("dp_size", "tp_size", "cp_size", "pp_size", "ep_size"):
        value = getattr(section, key)
        if value is not None and value > 1:
            raise ConfigError(
                f"distributed.{key}={value} needs several ranks, but this is one process: "
                f"add --nproc-per-node N (or launch with torchrun), or set {key}=1"
            )


def checkpoint_config_overrides(config: RecipeConfig, checkpoint_config) -> dict:
    """``model.config`` with from_pretrained: fields that replace the checkpoint's config.json values, as
    keywords of transformers' from_pretrained do (e.g. ``rope_parameters`` to extend the context)."""
    fields = dict(config.model.config or {})
    model_type = fields.pop("model_type", checkpoint_config.model_type)
    if model_type != checkpoint_config.model_type:
        raise ConfigError(
            f"model.config.model_type={model_type!r}, but {config.model.pretrained_model_name_or_path} holds a "
            f"{checkpoint_config.model_type!r} checkpoint; remove model_type (from_pretrained reads it from config.json)"
        )
    unknown = sorted(key for key in fields if not is_config_field(checkpoint_config, key))
    if unknown:
        raise ConfigError(f"model.config: {unknown} are not fields of the {model_type} config")
    return fields


def check_context_parallel_rope(config: RecipeConfig) -> None:
    """cp_size > 1 with a length-dependent RoPE (the model's or ``model.config``'s), refused before any
    rank starts (each rank would refuse it in ``apply_context_parallel``)."""
    if config.distributed.cp_size <= 1:
        return
    fields = dict(config.model.config or {})
    if config.model.component is from_pretrained and not {"rope_parameters", "rope_scaling"} & set(fields):
        fields = {"rope_parameters": load_config(config.model.pretrained_model_name_or_path).rope_parameters}
    why = context_parallel_refusal(rope_type(fields))
    if why is not None:
        raise ConfigError(f"distributed.cp_size={config.distributed.cp_size}: {why}")


def build_model(config: RecipeConfig, tokenizer, runtime: Runtime) -> tuple[nn.Module, Layout]:
    """The model in fp32 master weights, laid out over the ranks (FSDP2/EP/TP), in training mode.

    ``model._target_`` is called with the checkpoint path (from_pretrained; ``model.config`` fields
    override its config.json) or with a transformers config sized to the tokenizer (from_config).
    """
    section = config.model
    pretrained = section.component is from_pretrained
    hf_config = load_config(section.pretrained_model_name_or_path) if pretrained else hf_config_from_recipe(config, tokenizer)
    overrides = checkpoint_config_overrides(config, hf_config) if pretrained else {}
    kwargs = dict(backend=config.build_backend(), dtype=MASTER_DTYPE, device=runtime.device, **model_kwargs(config, hf_config))
    if config.peft is not None:
        kwargs.update(peft_arguments(config))
    taken = sorted(set(overrides) & set(kwargs))
    if taken:
        raise ConfigError(f"model.config: {taken} are set by the recipe's own keys (model.torch_dtype, backend, peft)")
    kwargs.update(overrides)
    check_single_process_layout(config, runtime)
    parallel = parallel_config(config, runtime) if runtime.distributed else None
    if pretrained:
        # NOTE: with a parallel layout each rank reads only its own shards from the checkpoint files.
        model = section.component(section.pretrained_model_name_or_path, parallel=parallel, **kwargs)
    else:
        torch.manual_seed(section.seed)  # NOTE: the same initial weights on every rank
        model = section.component(hf_config, **kwargs)
        if parallel is not None:
            parallelize_model(model, parallel)
    check_peft_model(config, model)
    if getattr(model, "pipeline", None) is not None:
        check_pipeline_batch(config, model)
    if parallel is None and config.distributed.activation_checkpointing:  # NOTE: one process recomputes blocks too
        apply_activation_checkpointing(model)
    if config.compile.enabled:
        compile_model(config, model)
    return model.train(), layout_of(config, runtime) if parallel is not None else Layout()


def compile_model(config: RecipeConfig, model: nn.Module) -> None:
    """The ``compile:`` section applied to the laid-out model (after FSDP2, EP and checkpointing)."""
    try:
        compile_blocks(model, config.compile.settings())
    except ValueError as err:
        raise ConfigError(f"compile: {err}") from None


def layout_of(config: RecipeConfig, runtime: Runtime) -> Layout:
    """This rank's place: the world is (pp, dp_replicate, dp_shard, cp, tp), tp innermost (distributed/mesh.py)."""
    tp, cp, pp = config.distributed.tp_size, config.distributed.cp_size, config.distributed.pp_size
    per_stage = runtime.world_size // pp
    local = runtime.rank % per_stage
    return Layout(
        dp_size=per_stage // (tp * cp),
        dp_rank=local // (tp * cp),
        tp_size=tp,
        cp_size=cp,
        cp_rank=(local // tp) % cp,
        pp_size=pp,
        pp_rank=runtime.rank // per_stage,
        sharded=True,
    )


def peft_arguments(config: RecipeConfig) -> dict:
    """What a LoRA run adds to the model's construction. The adapters are the trained weights: float32
    masters (unless ``peft.lora_dtype`` says otherwise), added before the layout so FSDP2 and EP
    shard them with their layers, drawn from the rng seed. The frozen base is loaded in the compute
    dtype: it needs no float32 master copy, and FSDP2 would cast it to that dtype anyway."""
    peft = config.peft.build()
    peft.lora_dtype = peft.lora_dtype or MASTER_DTYPE
    return dict(peft=peft, peft_seed=config.rng.seed, dtype=compute_dtype(config))


def check_peft_model(config: RecipeConfig, model: nn.Module) -> None:
    """LoRA settings that only the built model can check."""
    if config.loss_fn.component is FusedLinearCrossEntropy and isinstance(model.get_output_embeddings(), LoRALinear):
        raise ConfigError(
            "loss_fn FusedLinearCrossEntropy reads the LM head's weight directly and would skip its LoRA adapter: "
            "leave lm_head out of peft.target_modules, or use ernie45.training.loss.MaskedCrossEntropy"
        )


def set_grad_sync(model: nn.Module, layout: Layout, last_micro_batch: bool) -> None:
    """Under FSDP2, reduce gradients only in the last micro-batch's backward (pipeline stages reduce
    them at the end of each pipeline step, as torch's schedules do)."""
    if layout.sharded and layout.pp_size == 1:
        (prepare_for_final_backward if last_micro_batch else prepare_for_grad_accumulation)(model)


# ----- export ----------------------------------------------------------------------------------
def export_adapter(model: nn.Module, path: Path, config: RecipeConfig) -> None:
    """A LoRA run's adapters in HF PEFT's format (collective), naming the base checkpoint when there is one."""
    save_adapter(model, path, base_model=config.model.pretrained_model_name_or_path)


def export_hf(
    model: nn.Module, tokenizer, path: Path, config: RecipeConfig, runtime: Runtime, layout: Layout, final: bool = True
) -> None:
    """The trained model (in ``model.torch_dtype``) and its tokenizer in HF format (collective).

    ``final=False`` (mid-run, ``save_consolidated: every``): the weights as they are (float32 masters).
    A LoRA model is merged first (in place: training is over); mid-run its export is the adapter,
    in ``path``'s parent, since merging would end the training."""
    if has_adapters(model):
        if not final:
            export_adapter(model, path.parent / "adapter", config)
            return
        merge(model)
    if layout.sharded:
        model.save_pretrained(path)  # collective: every rank takes part, rank 0 writes
    elif runtime.is_main:
        # NOTE: once training is over the master weights can be cast in place (fp32-only tensors
        # such as the router weight and RoPE frequencies are protected by the model code).
        (model.to(compute_dtype(config)) if final else model).save_pretrained(path)
    if runtime.is_main:
        tokenizer.save_pretrained(str(path))
