"""The fine-tuning recipe's configuration: YAML sections named as in NeMo AutoModel, typed and validated.

A recipe file is a mapping of sections (``step_scheduler``, ``model``, ``dataset``, ...). It is
parsed into the pydantic models below, which reject unknown keys, wrong types and impossible
values with a message that names the key and what is valid (``ConfigError``).

``_target_`` keys name components the way AutoModel does, but a config never imports code: each
``_target_`` must be one of the names in ``registry.COMPONENTS`` (AutoModel's own names are accepted
as aliases of ours), anything else is an error listing the allowed names. A section stores the
canonical name; ``section.component`` is the object it names, and ``section.build()`` calls it with
the section's keys (which must be parameters of that object).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError
from pydantic import field_validator, model_validator

from ..auto import from_config, from_pretrained
from ..distributed.pipeline_split import SCHEDULES, canonical_schedule
from ..tokenizer import train_tokenizer
from .compile import CompileSettings, check_settings
from .preference import check_preference_recipe
from .registry import allowed_names, canonical_name, check_arguments, default_name, resolve

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the key(s) and what is valid."""


# NOTE: strict numbers: YAML `true`, `"8"` or `2.5` where a count belongs is a mistake to report,
# not 1, 8 or an error deep in the run. Floats take ints; nan and inf are refused (Section).
PositiveInt = Annotated[int, Strict(), Gt(0)]
NonNegativeInt = Annotated[int, Strict(), Ge(0)]
NonNegativeFloat = Annotated[float, Strict(), Ge(0)]
Seed = Annotated[int, Strict(), Ge(0), Lt(2**63)]  # NOTE: torch.manual_seed overflows past 2**64
MAX_THREADS_PER_CORE = 4  # dist_env.cpu_threads above this many x the cores is refused (100000 crashed torch)


def _target_field(kind: str, required: bool = False):
    """A ``_target_`` field; left out, it is the kind's default component (unless ``required``)."""
    return Field(None if required else default_name(kind), alias="_target_", description=f"one of {allowed_names(kind)}")


class Section(BaseModel):
    """A YAML section: unknown keys are errors, values are checked against the field types."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, allow_inf_nan=False)


def _canonical_backend(cls, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """A backend section's ``_target_`` (if given) checked against the allowlist."""
    if values and "_target_" in values:
        return {**values, "_target_": canonical_name("backend", values["_target_"])}
    return values


class TargetSection(Section):
    """A section whose ``_target_`` names a component of the registry (``kind``: which list)."""

    kind: ClassVar[str]

    @field_validator("target", mode="before", check_fields=False)
    @classmethod
    def _canonical_target(cls, value):
        return None if value is None else canonical_name(cls.kind, value)

    @model_validator(mode="after")
    def _target_given(self):
        if self.target is None:
            raise ValueError(f"_target_ is required; choose one of {allowed_names(self.kind)}")
        return self

    @property
    def component(self) -> Callable:
        """The object ``_target_`` names."""
        return resolve(self.kind, self.target)


class BuiltSection(TargetSection):
    """A section built by calling its component with its keys (those not None) as keyword arguments."""

    supplied: ClassVar[tuple[str, ...]] = ()  # parameters the recipe passes itself

    @model_validator(mode="after")
    def _keys_fit_component(self):
        check_arguments(self.kind, self.target, set(self.arguments()), self.supplied)
        return self

    def arguments(self) -> dict[str, Any]:
        return {key: value for key, value in self if key != "target" and value is not None}

    def build(self, *args, **kwargs):
        """The component, from the section's keys plus what the recipe supplies."""
        return self.component(*args, **self.arguments(), **kwargs)


# ----- sections --------------------------------------------------------------------------------
class StepSchedulerConfig(Section):
    """How many examples make one optimizer step, how many steps, when to checkpoint and validate."""

    global_batch_size: PositiveInt = Field(32, description="examples per optimizer step, over all ranks")
    local_batch_size: PositiveInt = Field(4, description="examples per forward on one rank (a micro-batch)")
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    num_epochs: PositiveInt = Field(1, description="passes over the training set (max_steps stops earlier)")
    ckpt_every_steps: PositiveInt | None = Field(None, description="resumable checkpoint every N steps (and at the end)")
    val_every_steps: PositiveInt | None = Field(None, description="validation loss every N steps (and at the end)")
    skip_nonfinite_steps: NonNegativeInt = Field(
        0, description="steps with a NaN/inf loss or gradient norm to skip (in all) before stopping; 0 stops at the first"
    )

    @model_validator(mode="after")
    def _batches_divide(self):
        if self.global_batch_size % self.local_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"local_batch_size={self.local_batch_size} (x the number of data-parallel ranks)"
            )
        return self


class ModelConfig(TargetSection):
    """The model: an HF checkpoint (from_pretrained) or a transformers config built from scratch (from_config)."""

    target: str = _target_field("model")
    pretrained_model_name_or_path: str | None = Field(None, description="HF checkpoint directory (from_pretrained)")
    config: dict[str, Any] | None = Field(
        None,
        description="transformers config fields: with model_type, a new model (from_config); with "
        "from_pretrained, values replacing the checkpoint's config.json (e.g. rope_parameters)",
    )
    torch_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="compute dtype; weights and optimizer state stay float32 (mixed precision)"
    )
    seed: Seed = Field(0, description="initialisation seed for from_config")
    backend: dict[str, Any] | None = Field(None, description="AutoModel's place for the backend section")
    kind: ClassVar[str] = "model"
    _backend = field_validator("backend")(_canonical_backend)

    @field_validator("config")
    @classmethod
    def _config_values(cls, fields: dict[str, Any] | None):
        if fields is not None and "model_type" in fields:
            check_model_fields(fields)
        elif fields is not None:  # overrides of a checkpoint's config.json: checked whole once it is read
            from ..models.validation import check_model_config

            check_model_config(fields)
        return fields

    @model_validator(mode="after")
    def _source_given(self):
        if self.component is from_pretrained and not self.pretrained_model_name_or_path:
            raise ValueError("from_pretrained needs pretrained_model_name_or_path (an HF checkpoint directory)")
        if self.component is from_config:
            if not self.config or "model_type" not in self.config:
                raise ValueError("from_config needs config: {model_type: ernie4_5 | ernie4_5_moe, ...}")
            if self.pretrained_model_name_or_path:
                raise ValueError("from_config builds a new model: remove pretrained_model_name_or_path")
        return self


class TokenizerConfig(TargetSection):
    """The tokenizer: loaded from a directory (default: the model's), or trained on the training texts."""

    target: str = _target_field("tokenizer")
    pretrained_model_name_or_path: str | None = Field(None, description="tokenizer directory (default: the model's)")
    vocab_size: Annotated[PositiveInt, Le(2**20)] | None = Field(
        None, description="vocabulary of a trained tokenizer (train_tokenizer), at most 2**20"
    )
    kind: ClassVar[str] = "tokenizer"

    @model_validator(mode="after")
    def _fields_match_target(self):
        if self.component is train_tokenizer:
            if self.vocab_size is None:
                raise ValueError("train_tokenizer needs vocab_size")
            if self.pretrained_model_name_or_path:
                raise ValueError("train_tokenizer trains a new tokenizer: remove pretrained_model_name_or_path")
        elif self.vocab_size is not None:
            raise ValueError("vocab_size is only for ernie45.tokenizer.train_tokenizer")
        return self


class DatasetConfig(BuiltSection):
    """A training or validation dataset: HellaSwag, SFT JSONL (prompt/completion or chat messages), or synthetic."""

    target: str | None = _target_field("dataset", required=True)
    path_or_dataset: str | None = Field(None, description="local JSONL file, or a hub id (needs `datasets`, online)")
    split: str | None = Field(None, description="hub split (default train; ignored for local files)")
    sample_offset: NonNegativeInt = Field(0, description="skip the first N records (e.g. to hold out part of a file)")
    num_samples_limit: PositiveInt | None = Field(None, description="use only N examples (after the offset)")
    seq_length: PositiveInt | None = Field(None, description="truncate sequences to N tokens")
    num_examples: Annotated[PositiveInt, Le(1_000_000)] | None = Field(
        None, description="synthetic: examples to generate (at most 1,000,000)"
    )
    seed: Seed | None = Field(None, description="synthetic: generator seed")
    kind: ClassVar[str] = "dataset"


class DataLoaderConfig(BuiltSection):
    """How training examples are ordered and padded."""

    target: str = _target_field("dataloader")
    collate_fn: str = Field(default_name("collate_fn"), description=f"one of {allowed_names('collate_fn')}")
    shuffle: bool = Field(True, description="a new seeded order every epoch")
    pad_to_multiple_of: Annotated[PositiveInt, Le(1024)] = Field(
        8, description="pad each micro-batch's length to a multiple of N (at most 1024)"
    )
    kind: ClassVar[str] = "dataloader"
    supplied: ClassVar[tuple[str, ...]] = ("examples", "pad_id")

    @field_validator("collate_fn", mode="before")
    @classmethod
    def _check_collate(cls, value):
        return canonical_name("collate_fn", value)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "collate_fn": resolve("collate_fn", self.collate_fn)}


class ValidationDataLoaderConfig(DataLoaderConfig):
    """How validation examples are batched."""

    batch_size: PositiveInt = Field(8, description="examples per validation forward")
    shuffle: Literal[False] = Field(False, description="validation keeps file order")


class OptimizerConfig(BuiltSection):
    target: str = _target_field("optimizer")
    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-8, gt=0)
    weight_decay: NonNegativeFloat = 0.0
    kind: ClassVar[str] = "optimizer"
    supplied: ClassVar[tuple[str, ...]] = ("params",)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas):
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={list(betas)} must both be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _fits_float32(self):
        # NOTE: the optimizer's float32 step takes scalars up to lr / (1 - beta1) (the first Adam step
        # size), lr * weight_decay (AdamW's decay) and eps; beyond float32's range torch fails inside it.
        largest = 3.4028234663852886e38
        scalars = {"lr / (1 - betas[0])": self.lr / (1 - self.betas[0]), "lr * weight_decay": self.lr * self.weight_decay, "eps": self.eps}
        for name, value in scalars.items():
            if value > largest:
                raise ValueError(f"{name} = {value:g} is beyond float32's range ({largest:.3g}); make it smaller")
        return self


class LRSchedulerConfig(Section):
    """Linear warm-up, then decay (AutoModel's keys)."""

    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_steps: NonNegativeInt = 0
    lr_decay_steps: PositiveInt | None = Field(None, description="default: until the last step")
    min_lr: NonNegativeFloat = 0.0


class LossConfig(BuiltSection):
    target: str = _target_field("loss_fn")
    chunk_size: PositiveInt | None = Field(None, description="FusedLinearCrossEntropy: tokens per logits chunk (default 1024)")
    kind: ClassVar[str] = "loss_fn"


class CheckpointConfig(Section):
    enabled: bool = True
    checkpoint_dir: str | None = Field(None, description="default OUTPUT_DIR/checkpoints; relative = under OUTPUT_DIR")
    keep_last_n: PositiveInt | None = Field(3, description="delete older step_N checkpoints (null keeps all)")
    model_save_format: Literal["safetensors"] = Field("safetensors", description="HF safetensors (torch_save is not supported)")
    save_consolidated: Literal["final", "every", "false"] = Field(
        "final",
        description="the model + tokenizer in HF format in OUTPUT_DIR/hf: at the end (final), also at every "
        "checkpoint (every, = true as in AutoModel), or never (false)",
    )
    is_async: bool = Field(False, description="asynchronous checkpoint writing: not implemented (false only)")

    @field_validator("save_consolidated", mode="before")
    @classmethod
    def _consolidated_mode(cls, value):
        # NOTE: AutoModel's legacy booleans: true means every checkpoint, false none.
        return {True: "every", False: "false"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("is_async")
    @classmethod
    def _synchronous(cls, value: bool):
        if value:
            raise ValueError("asynchronous checkpointing is not implemented: checkpoints are written before the next step; set it to false")
        return value


class ClipGradNormConfig(Section):
    max_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm (null: no clipping)")


class PipelineConfig(Section):
    """Pipeline stages (``distributed.pp_size`` > 1), as AutoModel's ``distributed.pipeline`` keys."""

    pp_schedule: str = Field("1F1B", description=f"one of {', '.join(SCHEDULES)} (case and '_' ignored)")
    pp_microbatch_size: PositiveInt = Field(1, description="rows per pipeline micro-batch; divides local_batch_size")
    layers_per_stage: PositiveInt | list[PositiveInt] | None = Field(
        None, description="null: split balanced by cost; N: ceil(layers / N) stages; a list: the layers of each stage"
    )

    @field_validator("pp_schedule")
    @classmethod
    def _known_schedule(cls, value: str):
        if canonical_schedule(value) is None:
            raise ValueError(f"unknown pipeline schedule {value!r}; use one of {', '.join(SCHEDULES)}")
        return canonical_schedule(value)


class DistributedConfig(Section):
    """Parallel layout (AutoModel's keys). dp_size defaults to whatever fills the world."""

    strategy: Literal["fsdp2"] = Field("fsdp2", description="FSDP2 (fully_shard) over the data-parallel ranks")
    dp_size: PositiveInt | None = None
    tp_size: PositiveInt = 1
    cp_size: PositiveInt = Field(1, description="context parallelism: each sequence split over cp ranks")
    pp_size: PositiveInt = Field(1, description="pipeline parallelism: the decoder layers in stages over pp ranks")
    ep_size: PositiveInt = Field(1, description="expert parallelism (MoE); folds onto the data-parallel ranks")
    sequence_parallel: bool = Field(False, description="not implemented (false only)")
    activation_checkpointing: bool = False
    pipeline: PipelineConfig = PipelineConfig()

    @field_validator("sequence_parallel")
    @classmethod
    def _no_sequence_parallel(cls, value: bool):
        if value:
            raise ValueError(
                "sequence parallelism is not implemented: tensor-parallel ranks keep whole activations; set it to false"
            )
        return value


class DistEnvConfig(Section):
    """Process group and CPU threads."""

    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    timeout_minutes: Annotated[PositiveInt, Le(7 * 24 * 60)] = Field(30, description="collective timeout (at most a week)")
    cpu_threads: PositiveInt | None = Field(
        None, description="torch threads per process on CPU (default: the cores, shared by the local ranks)"
    )
    keep_host_memory: bool = Field(
        True,
        description="CPU training: glibc keeps freed memory for the next step instead of returning it to the OS "
        "(fresh pages cost a page fault each; ernie45.host_memory); false: glibc's defaults",
    )

    @field_validator("cpu_threads")
    @classmethod
    def _threads_fit_the_machine(cls, threads: int | None):
        cores = os.cpu_count() or 1
        if threads is not None and threads > MAX_THREADS_PER_CORE * cores:
            raise ValueError(
                f"{threads} is more than {MAX_THREADS_PER_CORE} x the {cores} CPU cores of this machine; "
                f"use 1..{MAX_THREADS_PER_CORE * cores}, or leave it out to use the cores"
            )
        return threads


class DPOConfig(Section):
    """Preference training (DPO and variants; TRL's and ERNIEKit's names): with this section the finetune
    recipe trains on chosen/rejected pairs (``ernie45.training.preference``)."""

    beta: Annotated[float, Gt(0)] = Field(0.1, description="how far the policy may move from the reference (IPO: its tau)")
    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field("sigmoid", description="sigmoid (DPO), ipo, or simpo (no reference)")
    label_smoothing: Annotated[float, Ge(0), Lt(0.5)] = Field(
        0.0, description="cDPO: the chance a pair's label is flipped (sigmoid and simpo)"
    )
    reference_free: bool = Field(False, description="no reference model: its log-probs count as 0")
    sft_loss_ratio: NonNegativeFloat = Field(0.0, description="plus this x the chosen answer's mean token NLL")
    simpo_gamma: NonNegativeFloat | None = Field(None, description="simpo: the target reward margin (default 0.5)")
    precompute_ref_log_probs: bool = Field(
        False, description="reference log-probs computed once before training, then the reference model is freed"
    )

    @model_validator(mode="after")
    def _settings_fit_the_loss(self):
        if self.simpo_gamma is not None and self.loss_type != "simpo":
            raise ValueError(f"simpo_gamma is for loss_type simpo, not {self.loss_type}; remove it")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not ipo; set it to 0")
        if self.precompute_ref_log_probs and (self.reference_free or self.loss_type == "simpo"):
            raise ValueError("precompute_ref_log_probs: there is no reference model (reference_free or simpo); set it to false")
        return self


class RNGConfig(BuiltSection):
    target: str = _target_field("rng")
    seed: Seed = 42
    ranked: bool = Field(False, description="offset the seed by the rank")
    kind: ClassVar[str] = "rng"


class MoETrainingConfig(Section):
    """Router balancing during training (MoE models only)."""

    aux_loss_coef: NonNegativeFloat | None = Field(None, description="load-balancing loss weight (null: the model config's)")
    bias_update_rate: NonNegativeFloat = Field(0.0, description="aux-loss-free bias update per step (0 = off)")


class PeftSection(BuiltSection):
    """LoRA fine-tuning (AutoModel's ``peft:`` keys; see ``ernie45.peft``): only the adapters train,
    OUTPUT_DIR/adapter/ holds them in HF PEFT's format."""

    target: str = _target_field("peft")
    target_modules: list[str] | str = Field(
        [], description="module-name globs, e.g. '*_proj'; '*' also adapts the routed experts (default '*_proj')"
    )
    exclude_modules: list[str] | str = Field([], description="adapt every linear layer except these globs")
    match_all_linear: bool = Field(False, description="adapt every linear layer (not the routed experts)")
    dim: PositiveInt = Field(8, description="LoRA rank")
    alpha: Annotated[float, Gt(0)] = Field(32, description="scale = alpha / dim")
    dropout: Annotated[float, Ge(0), Lt(1)] = Field(0.0, description="dropout on the linear layers' LoRA path")
    dropout_position: Literal["pre", "post"] = Field("post", description="on the input (pre) or on the update (post)")
    lora_A_init: Literal["xavier", "kaiming"] = Field("xavier", description="A's init; B starts at zero")
    lora_dtype: str | None = Field(None, description="adapter dtype (default: the base weights')")
    moe_rank_scaling: bool = Field(False, description="routed experts get rank dim // moe_k")
    use_rslora: bool = Field(False, description="scale = alpha / sqrt(dim) (PEFT's rsLoRA)")
    use_dora: bool = Field(False, description="DoRA: not supported (false only)")
    use_triton: bool = Field(False, description="AutoModel's kernel choice: accepted, one LoRA kernel here (same math)")
    use_memory_efficient_lora: bool = Field(True, description="AutoModel's kernel choice: accepted, as use_triton")
    kind: ClassVar[str] = "peft"
    _KERNEL_CHOICES: ClassVar[tuple[str, ...]] = ("use_dora", "use_triton", "use_memory_efficient_lora")

    @field_validator("use_dora")
    @classmethod
    def _no_dora(cls, value: bool):
        if value:
            raise ValueError("DoRA is not supported by ernie45; set it to false (plain LoRA)")
        return value

    @model_validator(mode="after")
    def _valid_lora(self):
        self.build()  # NOTE: PeftConfig's own checks (globs, dtype, exclusive keys) name the key
        return self

    def arguments(self) -> dict[str, Any]:
        return {k: v for k, v in super().arguments().items() if k not in self._KERNEL_CHOICES}


class EvaluationConfig(Section):
    """Multiple-choice accuracy on the validation set before and after training (HellaSwag-format data)."""

    multiple_choice: bool = True
    num_samples_limit: PositiveInt | None = 200
    batch_size: PositiveInt = 16


class PackedSequenceConfig(Section):
    """Training examples packed into rows (AutoModel's keys); each document still attends only to itself."""

    packed_sequence_size: NonNegativeInt = Field(0, description="tokens per packed row (0: no packing)")
    split_across_pack: bool = Field(False, description="cut examples across rows instead of packing whole ones")


class CompileConfig(Section):
    """``torch.compile`` of each decoder block's training forward (AutoModel's keys; ``ernie45.training.compile``)."""

    enabled: bool = False
    mode: str = Field("default", description="default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
    fullgraph: bool = Field(False, description="one graph per block, no breaks (dense models only)")
    dynamic: bool | None = Field(
        None, description="null: torch's automatic dynamic shapes; false: one compilation per sequence length"
    )
    backend: str | None = Field(None, description="a torch.compile backend (null: inductor)")
    options: dict[str, Any] = Field({}, description="inductor options (instead of mode)")
    dynamo_cache_size_limit: PositiveInt = Field(256, description="compilations kept per block before it runs eagerly")

    @model_validator(mode="after")
    def _valid_settings(self):
        check_settings(self.settings())
        return self

    def settings(self) -> CompileSettings:
        return CompileSettings(**self.model_dump(exclude={"enabled"}))


class WandbConfig(Section):
    """Weights & Biases: the metrics.jsonl entries logged to a run (needs the wandb package: the ernie45 wandb extra)."""

    enable: bool = Field(True, description="false: the section is kept but nothing is logged")
    project: str = "ernie45"
    entity: str | None = None
    name: str | None = Field(None, description="run name (default: the output directory's name)")
    group: str | None = None
    tags: list[str] = []
    notes: str | None = None
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline: a local run dir to `wandb sync` later")
    dir: str | None = Field(
        None, validation_alias=AliasChoices("dir", "save_dir"), description="where wandb/ goes (default OUTPUT_DIR; or save_dir)"
    )


class MLflowConfig(Section):
    """MLflow: the metrics.jsonl entries logged to a run (needs the mlflow package: the ernie45 mlflow extra)."""

    experiment_name: str = "ernie45"
    run_name: str | None = Field(None, description="default: the output directory's name")
    tracking_uri: str | None = Field(None, description="default: a local store, OUTPUT_DIR/mlflow.db (SQLite)")
    artifact_location: str | None = None
    tags: dict[str, str] = {}
    description: str | None = None


class RecipeConfig(Section):
    """The whole recipe. Sections left out take their defaults."""

    recipe: Literal["finetune", "TrainFinetuneRecipeForNextTokenPrediction"] = Field(
        "finetune", description="the recipe (AutoModel's name is accepted)"
    )
    output_dir: str | None = Field(None, description="default runs/<timestamp>/")
    step_scheduler: StepSchedulerConfig = StepSchedulerConfig()
    model: ModelConfig
    backend: dict[str, Any] | None = Field(None, description="BackendConfig fields (attn, experts, ...)")
    tokenizer: TokenizerConfig = TokenizerConfig()
    dataset: DatasetConfig
    validation_dataset: DatasetConfig | None = None
    dataloader: DataLoaderConfig = DataLoaderConfig()
    validation_dataloader: ValidationDataLoaderConfig = ValidationDataLoaderConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_scheduler: LRSchedulerConfig = LRSchedulerConfig()
    loss_fn: LossConfig = LossConfig()
    dpo: DPOConfig | None = Field(None, description="preference training on chosen/rejected pairs (None: next-token loss)")
    clip_grad_norm: ClipGradNormConfig = ClipGradNormConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    dist_env: DistEnvConfig = DistEnvConfig()
    rng: RNGConfig = RNGConfig()
    moe: MoETrainingConfig = MoETrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    peft: PeftSection | None = Field(None, description="LoRA: train adapters only (None: full fine-tuning)")
    packed_sequence: PackedSequenceConfig = PackedSequenceConfig()
    compile: CompileConfig = CompileConfig()
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None

    _backend = field_validator("backend")(_canonical_backend)
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def notices(self) -> list[str]:
        """What ``load_recipe`` mapped to something that runs here, one line each (``compat``)."""
        return self._notices

    @model_validator(mode="after")
    def _consistent_sections(self):
        if self.backend is not None and self.model.backend is not None:
            raise ValueError("give the backend either as a top-level `backend` section or as `model.backend`, not both")
        if self.lr_scheduler.min_lr > self.optimizer.lr:
            raise ValueError(f"lr_scheduler.min_lr={self.lr_scheduler.min_lr} must not exceed optimizer.lr={self.optimizer.lr}")
        return self

    @model_validator(mode="after")
    def _compile_fits(self):
        if not self.compile.enabled:
            return self
        if self.distributed.tp_size > 1:
            raise ValueError(
                "compile.enabled with distributed.tp_size > 1 is not supported yet (the compiled blocks fail on "
                "tensor-parallel weights; FSDP2, expert, context and pipeline parallelism work); set compile.enabled: false"
            )
        return self

    @model_validator(mode="after")
    def _peft_fits(self):
        if self.peft is None:
            return self
        if self.distributed.tp_size > 1:
            raise ValueError("peft with distributed.tp_size > 1 is not supported yet; use dp/ep (FSDP2) or tp_size=1")
        if self.moe.bias_update_rate > 0:
            raise ValueError(
                "moe.bias_update_rate must be 0 with peft: the correction bias belongs to the frozen base model "
                "and is not part of the adapter"
            )
        return self

    def backend_target(self) -> str:
        return (self.backend or self.model.backend or {}).get("_target_", default_name("backend"))

    def backend_fields(self) -> dict[str, Any]:
        """The backend section's keys, without ``_target_``."""
        return {key: value for key, value in (self.backend or self.model.backend or {}).items() if key != "_target_"}

    def build_backend(self):
        """The model's kernels: the backend component (``BackendConfig``) from the section's keys."""
        return resolve("backend", self.backend_target()).from_dict(self.backend_fields())

    @model_validator(mode="after")
    def _preference_data_fits(self):
        check_preference_recipe(self)
        return self


def check_model_fields(fields: dict[str, Any]) -> None:
    """``model.config``'s values: those given, then the whole config with transformers' defaults filled in."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from ..checkpoint.hf_checkpoint import SUPPORTED_MODEL_TYPES
    from ..models.validation import check_model_config

    model_type = fields["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} must be one of {list(SUPPORTED_MODEL_TYPES)}")
    check_model_config(fields)
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != "model_type"})
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ValueError(" ".join(str(err).split())) from None
    check_model_config(config)


# ----- loading, overrides, errors --------------------------------------------------------------
# NOTE: real recipes have a few hundred YAML nodes; nested aliases (a "billion laughs" bomb) expand
# to billions while the file stays tiny, so the size is counted with aliases expanded.
MAX_YAML_NODES = 100_000


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def expanded_size(node: yaml.Node, sizes: dict[int, int] | None = None, open_nodes: set[int] | None = None) -> int:
    """Nodes under ``node`` with every alias expanded, counted without expanding (memoised per node)."""
    sizes = {} if sizes is None else sizes
    open_nodes = set() if open_nodes is None else open_nodes
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ValueError("an alias refers to a node that contains it")
    open_nodes.add(id(node))
    total = 1 + sum(expanded_size(child, sizes, open_nodes) for child in _yaml_children(node))
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers as YAML 1.2 does: ``1e-7`` and ``1.0e5`` are floats.

    NOTE: YAML 1.1 (PyYAML) wants a dot and a signed exponent, so AutoModel's ``eps: 1e-7`` would be
    the string "1e-7" and then refused as a float."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (with YAML 1.2 floats) and one-line errors naming ``source``, refusing alias
    bombs and self-references."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node)
        if size > MAX_YAML_NODES:
            raise ConfigError(
                f"{source} expands to {size:,} YAML nodes through its aliases (&anchor / *alias); "
                f"at most {MAX_YAML_NODES:,} are read: write the values out"
            )
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None
    except ConfigError:
        raise
    except ValueError as err:  # a self-referencing alias
        raise ConfigError(f"{source}: {err}; write the values out") from None
    except RecursionError:
        raise ConfigError(f"{source} nests its YAML too deeply to read") from None
    finally:
        loader.dispose()


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values parsed as YAML)."""
    overrides = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read {arg!r}: write config overrides as --section.key=value")
        key, _, text = arg[2:].partition("=")
        if not key:
            raise ConfigError(f"cannot read {arg!r}: the key before '=' is empty")
        overrides[key] = load_yaml(text, f"--{key}") if text else None
    return overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted key set (creating sections as needed)."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"override --{dotted}: {where} is a value ({child!r}), not a section")
            node = child
        node[leaf] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    raw = load_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (step_scheduler:, model:, ...), got {type(raw).__name__}")
    return raw


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for listing valid keys)."""
    model: Any = RecipeConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(error: dict) -> str:
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _section_model(loc)
        valid = sorted(f.alias or name for name, f in owner.model_fields.items()) if owner else []
        return f"{key}: unknown key; valid keys here: {valid}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error", "missing"):
        message += f" (got {error.get('input')!r})"
    return f"{key}: {message}"


def validate(raw: dict[str, Any], source: str = "recipe") -> RecipeConfig:
    """Typed config from a raw mapping; every problem is reported at once, by key."""
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as err:
        lines = "\n  ".join(_describe(e) for e in err.errors())
        raise ConfigError(f"invalid {source}:\n  {lines}") from None


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None, strict: bool = False) -> RecipeConfig:
    """Read a recipe file (default: the embedded one), apply ``--a.b=v`` overrides, map what of
    AutoModel's recipes cannot run here to the nearest that can (``compat``; ``strict``: refuse it
    instead), validate. ``config.notices`` holds the lines that say what was mapped."""
    from .compat import adapt_recipe

    path = Path(path) if path is not None else DEFAULT_RECIPE
    raw = apply_overrides(read_yaml(path), overrides or {})  # NOTE: its errors name the file already
    try:
        raw, notices = adapt_recipe(raw, strict, ConfigError)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    config = validate(raw, source=str(path))
    config._notices = notices
    return resolve_paths(config, path.parent if path != DEFAULT_RECIPE else None)


def resolve_paths(config: RecipeConfig, base: Path | None) -> RecipeConfig:
    """Relative local paths in a recipe file are read relative to the file's folder when they exist there."""
    if base is None:
        return config

    def fix(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute() or Path(value).exists():
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() else value

    config.model.pretrained_model_name_or_path = fix(config.model.pretrained_model_name_or_path)
    config.tokenizer.pretrained_model_name_or_path = fix(config.tokenizer.pretrained_model_name_or_path)
    for dataset in (config.dataset, config.validation_dataset):
        if dataset is not None:
            dataset.path_or_dataset = fix(dataset.path_or_dataset)
    return config


def to_yaml(config: RecipeConfig) -> str:
    """The resolved recipe (every default filled in), as saved in OUTPUT_DIR/config.yaml."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def sections_help() -> str:
    """Every section and key with its type and default, for ``ernie45 finetune --help``."""
    lines = []
    for name, field in RecipeConfig.model_fields.items():
        annotation = field.annotation
        models = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            lines.append(f"{name}: {field.description or ''}".rstrip(": "))
            continue
        section = models[0]
        lines.append(f"{name}: {(section.__doc__ or '').strip().splitlines()[0] if section.__doc__ else ''}".rstrip(": "))
        for key, sub in section.model_fields.items():
            default = "required" if sub.is_required() else repr(sub.default)
            note = f"  {sub.description}" if sub.description else ""
            lines.append(f"    {sub.alias or key} = {default}{note}")
    return "\n".join(lines)

