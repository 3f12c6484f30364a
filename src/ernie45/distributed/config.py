"""``ParallelConfig``: how a model is laid out over the ranks, checked before anything is built.

The world is split as ``dp_replicate x dp_shard x cp x tp`` (pipeline stages ``pp`` on top).
Expert parallelism does not add ranks: it folds onto the data- and tensor-parallel ranks like
the reference recipes (NeMo AutoModel), giving a second mesh ``(ep_shard, ep)`` over the same
ranks with ``ep_shard = dp_replicate * dp_shard * cp * tp / ep``. (When an ep group spans tp
peers, they send the experts the same tokens; the expert gradient scale accounts for it.)

Every check raises at the boundary with the offending value and what would be valid, so a bad
launch fails in the first second instead of deep inside a collective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.dimensions import kv_heads_of
from ..moe.config import MoEConfig
from .pipeline_split import SCHEDULES, StageSplit, canonical_schedule, head_cost, layer_costs, num_stages_for, split_layers

_SIZES = ("dp_replicate", "dp_shard", "tp", "ep", "cp", "pp")


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world size or this model."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Sizes of each parallel dimension (``-1`` for ``dp_shard`` = whatever fills the world).

    dp_replicate: data-parallel replicas (HSDP when combined with dp_shard > 1).
    dp_shard: FSDP2 shards (``fully_shard``); -1 fills the world.
    tp: tensor parallelism (attention heads, MLP width, vocabulary).
    ep: expert parallelism; folds onto the dp x tp ranks, adds none.
    cp: context parallelism: each sequence split over cp ranks (``context_parallel.py``); parameters
        are FSDP-sharded over dp_shard x cp.
    pp: pipeline parallelism (``torch.distributed.pipelining``): each rank holds the decoder layers
        of its stages; the world is split ``pp x dp_replicate x dp_shard x cp x tp``.
    pp_schedule: "1F1B", "GPipe" (one stage per rank) or "Interleaved1F1B" (several).
    pp_microbatch_size: rows per pipeline micro-batch; it must divide each rank's batch.
    layers_per_stage: None (split balanced by cost; 2 stages per rank for interleaved schedules),
        an int (that many stages: ceil(layers / layers_per_stage), still balanced by cost) or a
        list of layer counts, one per stage.
    param_dtype / reduce_dtype: FSDP2 ``MixedPrecisionPolicy`` (compute in bf16, reduce
        gradients in fp32 by default; ``param_dtype=None`` computes in the stored dtype).
    reshard_after_forward: FSDP2 frees gathered parameters after forward (ZeRO-3) when True.
    activation_checkpointing: recompute each decoder block in backward.
    sharded_logits: under tp > 1, return vocabulary-sharded logits (a DTensor) instead of a
        plain full tensor; compute the loss on them under
        ``torch.distributed.tensor.parallel.loss_parallel()`` (the model's ``labels=`` loss
        needs full logits).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatch_size: int = 1
    layers_per_stage: int | Sequence[int] | None = None
    param_dtype: torch.dtype | None = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    sharded_logits: bool = False

    def __post_init__(self) -> None:
        for name in _SIZES:
            value = getattr(self, name)
            allowed_fill = name == "dp_shard" and value == -1
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and not allowed_fill):
                fill = " or -1 (fill the world)" if name == "dp_shard" else ""
                raise LayoutError(f"ParallelConfig.{name}={value!r} must be a positive integer{fill}")
        self._check_pipeline_fields()

    def _check_pipeline_fields(self) -> None:
        schedule = canonical_schedule(self.pp_schedule) if isinstance(self.pp_schedule, str) else None
        if schedule is None:
            raise LayoutError(
                f"ParallelConfig.pp_schedule={self.pp_schedule!r} is not a known schedule; "
                f"valid: {', '.join(SCHEDULES)} (case and '_' ignored)"
            )
        object.__setattr__(self, "pp_schedule", schedule)  # NOTE: frozen; the canonical spelling
        if not _positive_int(self.pp_microbatch_size):
            raise LayoutError(f"ParallelConfig.pp_microbatch_size={self.pp_microbatch_size!r} must be a positive integer")
        per_stage = self.layers_per_stage
        if per_stage is not None and not isinstance(per_stage, int):
            per_stage = tuple(per_stage) if isinstance(per_stage, Sequence) and not isinstance(per_stage, str) else per_stage
            object.__setattr__(self, "layers_per_stage", per_stage)
        if per_stage is not None and not (
            _positive_int(per_stage) or (isinstance(per_stage, tuple) and per_stage and all(map(_positive_int, per_stage)))
        ):
            raise LayoutError(
                f"ParallelConfig.layers_per_stage={self.layers_per_stage!r} must be a positive integer, "
                "a list of positive layer counts (one per stage) or None (split by cost)"
            )
        if self.pp > 1 and self.cp > 1:
            raise LayoutError(f"pp={self.pp} with cp={self.cp} is not supported yet: use one of them")

    @property
    def data_parallel(self) -> int:
        """Ranks that see different data (replicas x shards)."""
        if self.dp_shard == -1:
            raise LayoutError("dp_shard=-1 is only known once the world size is: call resolve(world_size) first")
        return self.dp_replicate * self.dp_shard

    @property
    def ep_shard(self) -> int:
        """FSDP shards of each expert group: the ranks that hold the same experts."""
        return self.data_parallel * self.cp * self.tp // self.ep

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.cp * self.tp * self.pp

    def resolve(self, world_size: int) -> "ParallelConfig":
        """This layout with ``dp_shard=-1`` filled in for ``world_size`` ranks, validated."""
        others = self.dp_replicate * self.tp * self.cp * self.pp
        product = " x ".join(f"{name}={getattr(self, name)}" for name in _SIZES if name != "dp_shard")
        if self.dp_shard == -1:
            if world_size % others:
                raise LayoutError(
                    f"world size {world_size} is not divisible by {product} (= {others}); "
                    f"dp_shard=-1 needs the other sizes to divide the world"
                )
            resolved = dataclasses.replace(self, dp_shard=world_size // others)
        else:
            resolved = self
        if resolved.world_size != world_size:
            raise LayoutError(
                f"world size {world_size} is not the product of the parallel sizes "
                f"({product}, dp_shard={resolved.dp_shard}: {resolved.world_size} ranks); "
                "set dp_shard=-1 to fill the world"
            )
        if (resolved.data_parallel * resolved.cp * resolved.tp) % resolved.ep:
            raise LayoutError(
                f"ep={resolved.ep} must divide the data-parallel ranks it folds onto "
                f"(dp_replicate x dp_shard x cp x tp = {resolved.data_parallel * resolved.cp * resolved.tp})"
            )
        return resolved


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _num_experts(config) -> int:
    return int(getattr(config, "moe_num_experts", 0) or 0)


def check_model_fits(parallel: ParallelConfig, config) -> None:
    """Raise ``LayoutError`` when the model's shapes cannot be split the way ``parallel`` asks."""
    tp = parallel.tp
    divisible_by_tp = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": kv_heads_of(config),
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    if _num_experts(config) and getattr(config, "moe_num_shared_experts", 0):
        divisible_by_tp["moe_intermediate_size x moe_num_shared_experts"] = (
            config.moe_intermediate_size * config.moe_num_shared_experts
        )
    for name, value in divisible_by_tp.items():
        if value % tp:
            raise LayoutError(f"tp={tp} must divide {name}={value} of {config.model_type}")
    if parallel.ep > 1:
        experts = _num_experts(config)
        if not experts:
            raise LayoutError(f"ep={parallel.ep} needs a mixture-of-experts model; {config.model_type} has no experts")
        if experts % parallel.ep:
            raise LayoutError(f"ep={parallel.ep} must divide moe_num_experts={experts}")
    if parallel.pp > 1:
        plan_stages(parallel, config)


def plan_stages(parallel: ParallelConfig, config, moe_config: MoEConfig | None = None) -> StageSplit:
    """The decoder layers of each pipeline stage for ``parallel`` (see ``pipeline_split.py``)."""
    pp, schedule, per_stage = parallel.pp, parallel.pp_schedule, parallel.layers_per_stage
    layers = config.num_hidden_layers
    stages = num_stages_for(pp, schedule, per_stage, layers)
    asked = f"layers_per_stage={list(per_stage) if isinstance(per_stage, tuple) else per_stage}"
    if not SCHEDULES[schedule] and stages != pp:
        raise LayoutError(
            f"pp_schedule={schedule} runs one stage per pipeline rank, but {asked} makes {stages} stages "
            f"for pp={pp}; use pp_schedule=Interleaved1F1B or a layers_per_stage that makes {pp} stages"
        )
    if stages % pp:
        raise LayoutError(f"{asked} makes {stages} stages, not a multiple of pp={pp} ({schedule} gives each rank the same number)")
    if layers < stages:
        raise LayoutError(
            f"{config.model_type} has num_hidden_layers={layers}, fewer than the {stages} pipeline stages of "
            f"pp={pp} ({schedule}); every stage needs at least one decoder layer: lower pp"
            + (" or use a one-stage-per-rank schedule (1F1B)" if SCHEDULES[schedule] else "")
        )
    if moe_config is None and _num_experts(config):
        moe_config = MoEConfig.from_hf_config(config)
    costs = layer_costs(config, moe_config)
    first, last = sum(costs) // len(costs), head_cost(config)  # the embedding as a mean layer
    if isinstance(per_stage, tuple):
        if sum(per_stage) != layers:
            raise LayoutError(f"{asked} adds up to {sum(per_stage)} layers; {config.model_type} has num_hidden_layers={layers}")
        counts = list(per_stage)
    else:
        counts = split_layers(costs, stages, first, last)
    bounds = [sum(counts[:s]) for s in range(stages + 1)]
    ranges = tuple(range(bounds[s], bounds[s + 1]) for s in range(stages))
    stage_costs = [sum(costs[i] for i in r) for r in ranges]
    stage_costs[0] += first
    stage_costs[-1] += last
    return StageSplit(ranges, pp, tuple(stage_costs))
