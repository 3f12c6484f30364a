"""Which decoder layers each pipeline stage holds, and which pipeline rank runs each stage.

Cost of a stage (matmul weights per token, from ``models/accounting.py``):
  * its decoder layers: attention + the feed-forward (an MoE layer counts its K active experts,
    shared experts and router, so MoE and dense layers weigh what they compute);
  * the first stage also the embedding, counted as one mean decoder layer (the lookup is cheap,
    but its [V,H] weight, gradient and optimizer state sit there);
  * the last stage also the LM head, a [V,H] matmul per token: with ERNIE 4.5's 103k vocabulary
    several layers' worth (0.3B: about 7.5 layers).
The split minimises the most expensive stage, every stage keeping at least one decoder layer.
Stages go round-robin over the pipeline ranks ("loop" order, as torch's schedules expect):
stage s runs on pipeline rank s % pp, so interleaved schedules give each rank several stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..models.accounting import attention_counts, feed_forward_counts
from ..moe.config import MoEConfig

# Schedule name -> whether it runs several stages per rank (torch.distributed.pipelining names).
SCHEDULES = {"GPipe": False, "1F1B": False, "Interleaved1F1B": True}
DEFAULT_STAGES_PER_RANK = 2  # interleaved schedules without layers_per_stage


def canonical_schedule(name: str) -> str | None:
    """The schedule's canonical name, matched ignoring case, '_' and '-' ("interleaved_1f1b"); None if unknown."""
    key = name.replace("_", "").replace("-", "").lower()
    return next((known for known in SCHEDULES if known.lower() == key), None)


@dataclass(frozen=True)
class StageSplit:
    """Decoder layers per stage (``layers[s]``: the layer indices of stage s) over ``pp`` ranks."""

    layers: tuple[range, ...]
    pp: int
    costs: tuple[int, ...]  # cost of each stage, as split_layers weighed it

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def stages_of(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank ``pp_rank`` runs (loop order)."""
        return list(range(pp_rank, self.num_stages, self.pp))

    def describe(self) -> str:
        """One line per stage: rank, what it holds and its share of the cost (printed at start)."""
        total = sum(self.costs)
        lines = []
        for stage, (layers, cost) in enumerate(zip(self.layers, self.costs)):
            parts = ["embedding"] if stage == 0 else []
            parts.append(f"layers {layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"layer {layers.start}")
            if stage == self.num_stages - 1:
                parts.append("final norm + LM head")
            lines.append(
                f"pipeline stage {stage} (pp rank {stage % self.pp}): {' + '.join(parts)}, {100 * cost / total:.0f}% of the cost"
            )
        return "\n".join(lines)


def layer_costs(config, moe_config: MoEConfig | None) -> list[int]:
    """Matmul weights per token of each decoder layer (attention + dense MLP or MoE layer)."""
    attention = attention_counts(config).matmul
    return [attention + feed_forward_counts(config, i, moe_config).matmul for i in range(config.num_hidden_layers)]


def head_cost(config) -> int:
    return config.vocab_size * config.hidden_size


def split_layers(costs: Sequence[int], num_stages: int, first_extra: int, last_extra: int) -> list[int]:
    """Layers per stage, contiguous, >= 1 each, minimising the most expensive stage.

    Dynamic programme over (stages used, layers covered); integer costs, so every rank finds the
    same split. ``first_extra`` / ``last_extra`` are added to the first / last stage.
    """
    n = len(costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(stage: int, start: int, stop: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    # best[s][j]: the smallest maximum stage cost of stages 0..s covering layers [0, j); cut[s][j]: where stage s starts
    best = [[math.inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = stage_cost(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                candidate = max(best[s - 1][i], stage_cost(s, i, j))
                if candidate < best[s][j]:
                    best[s][j], cut[s][j] = candidate, i
    counts, stop = [], n
    for s in range(num_stages - 1, 0, -1):
        counts.append(stop - cut[s][stop])
        stop = cut[s][stop]
    return [stop] + counts[::-1]


def num_stages_for(pp: int, schedule: str, layers_per_stage: int | Sequence[int] | None, num_layers: int) -> int:
    """How many stages the layout asks for (checked against the schedule by ``plan_stages``)."""
    if layers_per_stage is None:
        return pp * (DEFAULT_STAGES_PER_RANK if SCHEDULES[schedule] else 1)
    if isinstance(layers_per_stage, int):
        return math.ceil(num_layers / layers_per_stage)
    return len(layers_per_stage)
