"""Pipeline parallelism on ``torch.distributed.pipelining``: this rank's stages of a causal LM,
run by PyTorch's schedules (GPipe, 1F1B, Interleaved1F1B).

As torchtitan does it: the whole model is built on the meta device, then each rank keeps only
the decoder layers of its stages (``model.model.layers`` keeps them keyed by their index in the
whole model, so every tensor keeps its HF name) and the embedding, final norm and LM head become
None where its stages do not hold them. A tied LM head on the last stage is its own copy of the
embedding: ``reduce_tied_gradients`` sums the two gradients, so both copies take the same
optimizer step and stay equal.

Each stage is a ``StageModule`` over the model's own blocks: (embedding) -> its blocks -> (final
norm), sending the hidden states [mb,S,H] to the next stage; with the MoE aux loss on, also the
routing statistics summed so far (router probability sums [E] with their gradient, expert counts
[E], rows [1]), so the last stage computes transformers' aux loss over ALL layers and its
gradient flows back into every stage's routers. The last stage's output goes to the loss: the
caller's ``loss_fn(lm_head, hidden, labels)`` (default: logits + summed cross-entropy; the
fine-tune recipe passes its fused linear + cross-entropy) divided by ``loss_divisor``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import ScheduleGPipe, ScheduleLoopedBFS, get_schedule_class
from torch.distributed.tensor import DTensor

from ..models.decoder import DecoderLayers
from ..models.loss import shifted_cross_entropy
from ..moe.aux_loss import AuxStats, aux_loss_stats, load_balancing_loss
from ..sharding import local_part
from .config import LayoutError
from .mesh import ParallelMeshes
from .model_parts import is_tied, moe_layer
from .pipeline_split import SCHEDULES, StageSplit

HeadLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def logits_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default loss of a pipeline step: the LM head's logits, summed shifted cross-entropy."""
    return shifted_cross_entropy(head(hidden), labels, reduction="sum")


def keep_stages(model: nn.Module, split: StageSplit, stages: list[int]) -> None:
    """Drop from ``model`` (in place; built on meta, nothing allocated) what other ranks' stages hold."""
    decoder = model.model
    decoder.layers = DecoderLayers({i: decoder.layers[i] for s in stages for i in split.layers[s]})
    if 0 not in stages:
        decoder.embed_tokens = None
    if split.num_stages - 1 not in stages:
        decoder.norm = None
        model.lm_head = None


class StageModule(nn.Module):
    """One pipeline stage over the model's own modules: (embedding) -> blocks -> (final norm).

    ``forward(x, *routing, position_ids=, attention_mask=, padding_mask=)``: x is token ids on the
    first stage, the previous stage's hidden states elsewhere. The LM head is registered on the
    last stage (FSDP2 then treats it as part of this stage) but run by the loss.
    """

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool, activation_dtype: torch.dtype):
        super().__init__()
        decoder = model.model
        self.embed_tokens = decoder.embed_tokens if first else None
        self.layers = nn.ModuleList([decoder.layers[i] for i in layers])
        self.norm = decoder.norm if last else None
        self.lm_head = model.lm_head if last else None
        # NOTE: bound methods, not submodules: FSDP2 must not adopt the other stages' modules.
        self.embed = decoder.embed
        self.layer_inputs = decoder.layer_inputs
        self.activation_dtype = activation_dtype
        self.expert_loads: dict[int, torch.Tensor] = {}  # tokens per expert of each MoE layer, summed over forwards
        moe = model.moe_config
        self.num_experts = moe.n_routed_experts if moe is not None else 0
        self.top_k = moe.n_activated_experts if moe is not None else 0
        self.carry_routing = False  # set per step: when the MoE aux loss is asked for

    def forward(
        self,
        x: torch.Tensor,
        *routing: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        h = self.embed(x, None) if self.embed_tokens is not None else x
        rope, mask, padding_mask = self.layer_inputs(h, position_ids, attention_mask, padding_mask)
        stats = list(routing) or (self.no_routing(h.device) if self.carry_routing else [])
        for block in self.layers:
            h = block(h, rope, mask, padding_mask)
            self.count_load(block)
            if self.carry_routing:
                stats = add_routing(stats, block, self.top_k)
        if self.norm is not None:
            h = self.norm(h)
        h = h.to(self.activation_dtype)
        return (h, *stats) if self.carry_routing else h

    def count_load(self, block: nn.Module) -> None:
        """Add the tokens per expert that ``block``'s MoE layer (if any) routed just now."""
        mlp = moe_layer(block)
        if mlp is not None and mlp.last_record is not None:
            load = mlp.last_record.tokens_per_expert
            self.expert_loads[mlp.layer_idx] = self.expert_loads.get(mlp.layer_idx, 0) + load

    def no_routing(self, device: torch.device) -> list[torch.Tensor]:
        """Routing statistics before any layer: probability sums [E], counts [E], rows [1] (fp32)."""
        zeros = torch.zeros(self.num_experts, device=device)
        return [zeros, zeros.clone(), torch.zeros(1, device=device)]


def add_routing(stats: list[torch.Tensor], block: nn.Module, top_k: int) -> list[torch.Tensor]:
    """``stats`` plus what the MoE layer of ``block`` (if any) routed in its forward just now."""
    mlp = moe_layer(block)
    record = mlp.last_record if mlp is not None else None
    if record is None or record.router_probs is None:
        return stats
    layer = aux_loss_stats(record.router_probs, top_k, record.keep)
    return [stats[0] + layer.prob_sum, stats[1] + layer.counts, stats[2] + layer.rows]


class StepLosses(NamedTuple):
    """What one pipeline step computed, on every pipeline rank."""

    loss: torch.Tensor  # sum over micro-batches of loss_fn / loss_divisor (without the aux loss)
    aux_loss: torch.Tensor | None  # mean over micro-batches of the unweighted MoE aux loss (None: not computed)


class Pipeline:
    """This rank's stages of a model laid out with ``pp > 1``, and the schedule that runs them.

    Collective over the pipeline ranks: every rank of a pipeline calls ``step`` with the same batch
    (token ids are used by the first stage, labels by the last, masks and positions by all).
    """

    def __init__(self, model: nn.Module, meshes: ParallelMeshes, split: StageSplit):
        self.model, self.split, self.layout = model, split, meshes.parallel
        self.group = meshes.pp.get_group()
        self.stage_ids = split.stages_of(meshes.pp.get_local_rank())
        self.holds_first, self.holds_last = 0 in self.stage_ids, split.num_stages - 1 in self.stage_ids
        self.last_rank = dist.get_global_rank(self.group, (split.num_stages - 1) % split.pp)
        layout = meshes.parallel
        fsdp_casts = meshes.dp is not None and layout.param_dtype is not None
        self.activation_dtype = layout.param_dtype if fsdp_casts else model.dtype
        last = split.num_stages - 1
        self.stages = [
            StageModule(model, split.layers[s], s == 0, s == last, self.activation_dtype) for s in self.stage_ids
        ]
        self.tied_group = tied_pair_group(meshes) if is_tied(model) else None
        self._schedules: dict[tuple, object] = {}
        self._settings: tuple[HeadLoss, float, float] = (logits_loss, 1.0, 0.0)
        self._losses: list[torch.Tensor] = []
        self._aux_losses: list[torch.Tensor] = []

    def __repr__(self) -> str:
        stages = " and ".join(map(str, self.stage_ids))
        return (
            f"pipeline stage{'s' if len(self.stage_ids) > 1 else ''} {stages} of {self.split.num_stages} "
            f"(pp={self.split.pp}, {self.layout.pp_schedule})"
        )

    # ----- what this rank holds -------------------------------------------------------------------
    def held_elsewhere(self, hf_key: str) -> bool:
        """Whether checkpoint tensor ``hf_key`` belongs to a stage another pipeline rank holds."""
        layer = _LAYER_KEY.match(hf_key)
        if layer:
            return int(layer[1]) not in {i for s in self.stage_ids for i in self.split.layers[s]}
        if hf_key.startswith("model.embed_tokens."):
            return not self.holds_first
        return hf_key.startswith(("model.norm.", "lm_head.")) and not self.holds_last

    def tied_copies(self) -> list[nn.Parameter]:
        """The tied LM-head copy on the last stage (else nothing): a gradient norm summed over the
        pipeline ranks counts it once, as the embedding."""
        return [self.model.lm_head.weight] if self.tied_group is not None and self.holds_last else []

    # ----- running ----------------------------------------------------------------------------------
    def step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_fn: HeadLoss = logits_loss,
        loss_divisor: float = 1.0,
        aux_loss_weight: float = 0.0,
        backward: bool = True,
    ) -> StepLosses:
        """Forward (and backward) of one batch [B,S], ``B / pp_microbatch_size`` micro-batches.

        Each micro-batch's loss is ``loss_fn(lm_head, hidden, labels) / loss_divisor`` (+
        ``aux_loss_weight`` x its MoE aux loss / micro-batches); gradients accumulate into the
        parameters as a single backward of the summed loss would. ``backward=False`` (validation):
        forward only, the whole batch as one micro-batch, so any number of rows works.
        """
        rows, seq = labels.shape
        carry_routing = aux_loss_weight > 0
        schedule, micro = self._schedule_for(rows, seq, labels.device, carry_routing, backward)
        self._settings = (loss_fn, float(loss_divisor), aux_loss_weight / micro)
        self._losses, self._aux_losses = [], []
        for module in self.stages:
            module.carry_routing, module.expert_loads = carry_routing, {}
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids.expand(rows, -1)  # NOTE: split into micro-batches along rows
        inputs = dict(attention_mask=attention_mask, padding_mask=padding_mask, position_ids=position_ids)
        kwargs = {name: value for name, value in inputs.items() if value is not None}
        args = (input_ids,) if self.holds_first else ()
        target = labels if self.holds_last else None
        if backward:
            schedule.step(*args, target=target, **kwargs)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, **kwargs)
        return self._gather_losses(labels.device, carry_routing)

    def expert_loads(self) -> dict[int, torch.Tensor]:
        """{MoE layer index: [E] tokens per expert} of this rank's layers, summed over the last step's micro-batches."""
        return {idx: load for module in self.stages for idx, load in module.expert_loads.items()}

    def _microbatch_loss(self, output: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn, on the last stage: head loss / divisor (+ weighted aux loss)."""
        hidden, *routing = output if isinstance(output, tuple) else (output,)
        loss_fn, divisor, aux_weight = self._settings
        loss = loss_fn(self.stages[-1].lm_head, hidden, labels) / divisor
        self._losses.append(loss.detach())
        if routing:
            prob_sum, counts, rows = routing
            aux = load_balancing_loss([AuxStats(counts, prob_sum, rows.sum())], len(counts))
            self._aux_losses.append(aux.detach())
            loss = loss + aux_weight * aux
        return loss

    def _gather_losses(self, device: torch.device, with_aux: bool) -> StepLosses:
        """The last stage's summed losses, broadcast to every pipeline rank."""
        totals = torch.zeros(2, device=device)
        if self.holds_last:
            totals[0] = torch.stack(self._losses).sum()
            if with_aux:
                totals[1] = torch.stack(self._aux_losses).mean()
        dist.broadcast(totals, src=self.last_rank, group=self.group)
        return StepLosses(totals[0], totals[1] if with_aux else None)

    def _schedule_for(self, rows: int, seq: int, device: torch.device, carry_routing: bool, train: bool):
        """(schedule, micro-batches) for batches of [rows, seq]. Stages send fixed-shape buffers,
        declared up front (no metadata round trip), so each shape has its own schedule.

        Forward-only steps run the whole batch as one micro-batch (GPipe, or LoopedBFS for several
        stages per rank): there is no backward to overlap, and any batch size works."""
        micro_rows = self._micro_rows(rows, train)
        if carry_routing and not self.stages[0].num_experts:
            raise ValueError("aux_loss_weight > 0 needs a mixture-of-experts model")
        key = (rows, seq, device, carry_routing, train)
        if key not in self._schedules:
            if len(self._schedules) >= 4:  # NOTE: each holds receive buffers; batch shapes rarely repeat beyond a few
                self._schedules.pop(next(iter(self._schedules)))
            self._schedules[key] = self._build_schedule(rows // micro_rows, micro_rows, seq, device, carry_routing, train)
        return self._schedules[key], rows // micro_rows

    def check_batch(self, rows: int) -> None:
        """Raise LayoutError now if training steps cannot run batches of ``rows`` rows per rank (the
        schedule is built and dropped; nothing runs)."""
        micro_rows = self._micro_rows(rows, train=True)
        self._build_schedule(rows // micro_rows, micro_rows, 1, torch.device("cpu"), False, True)

    def _micro_rows(self, rows: int, train: bool) -> int:
        """Rows per micro-batch: pp_microbatch_size for training (it must divide the batch), all for forward-only."""
        micro_rows = self.layout.pp_microbatch_size if train else rows
        if rows % micro_rows:
            raise LayoutError(
                f"the batch of {rows} rows on this rank is not divisible by pp_microbatch_size={micro_rows}; "
                "make the per-rank batch a multiple of it"
            )
        return micro_rows

    def _build_schedule(
        self, micro: int, micro_rows: int, seq: int, device: torch.device, carry_routing: bool, train: bool
    ):
        hidden = torch.empty(micro_rows, seq, self.model.config.hidden_size, dtype=self.activation_dtype, device="meta")
        sent = (hidden.requires_grad_(),)
        if carry_routing:
            experts = self.stages[0].num_experts
            prob_sum = torch.empty(experts, device="meta").requires_grad_()
            sent += (prob_sum, torch.empty(experts, device="meta"), torch.empty(1, device="meta"))
        ids = torch.empty(micro_rows, seq, dtype=torch.long, device="meta")
        stages = [
            PipelineStage(
                module, index, self.split.num_stages, device,
                input_args=(ids,) if index == 0 else sent, output_args=sent, group=self.group,
            )
            for index, module in zip(self.stage_ids, self.stages)
        ]  # fmt: skip
        several = SCHEDULES[self.layout.pp_schedule]
        if train:
            schedule_class = get_schedule_class(self.layout.pp_schedule)
        else:
            schedule_class = ScheduleLoopedBFS if several else ScheduleGPipe
        try:
            return schedule_class(
                stages if several else stages[0],
                n_microbatches=micro,
                loss_fn=self._microbatch_loss,
                scale_grads=False,  # NOTE: the losses are sums already divided by loss_divisor
            )
        except ValueError as err:
            raise LayoutError(
                f"pp_schedule={self.layout.pp_schedule} cannot run {micro} micro-batches "
                f"(rows per rank / pp_microbatch_size={micro_rows}) over {self.split.num_stages} stages: {err}"
            ) from None

    # ----- after the backward -----------------------------------------------------------------------
    @torch.no_grad()
    def reduce_tied_gradients(self) -> None:
        """Sum the gradients of the embedding (first stage) and its tied LM-head copy (last stage).

        Call once after the last backward of a step, before clipping and the optimizer step (a
        no-op without tied embeddings). Both copies then get the same update and stay equal.
        """
        if self.tied_group is None or not (self.holds_first or self.holds_last):
            return
        weight = self.model.model.embed_tokens.weight if self.holds_first else self.model.lm_head.weight
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        if isinstance(grad, DTensor) and grad.placements != weight.placements:
            # NOTE: under TP the vocab-parallel embedding's gradient comes back replicated, the head's sharded.
            grad = grad.redistribute(weight.device_mesh, weight.placements)
        dist.all_reduce(local_part(grad), group=self.tied_group)
        weight.grad = grad


def tied_pair_group(meshes: ParallelMeshes) -> dist.ProcessGroup | None:
    """The (first stage, last stage) pair of ranks holding this rank's copies of a tied embedding.

    Collective: every rank creates every pair's group, in the same order. None on middle stages.
    """
    ranks = meshes.world.mesh  # [pp, dp_replicate, dp_shard, cp, tp]
    mine = None
    for column in ranks.reshape(ranks.shape[0], -1).T.tolist():
        pair = [column[0], column[-1]]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine
