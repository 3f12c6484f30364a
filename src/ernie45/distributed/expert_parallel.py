"""Expert parallelism: experts split ``Shard(0)`` over the ``ep`` mesh, tokens moved by all-to-all.

Shapes: T tokens on this rank, H hidden, E experts in the layer, P = ep ranks, L = E/P experts
per rank (rank r holds experts [r*L, (r+1)*L)), S rows this rank sends, R rows it receives.

    dispatch: sort the (token, choice) rows by global expert (``LocalDispatcher``), so the rows
              for rank r are contiguous           x_send [S,H], counts [E] = [P,L]
              all-to-all the counts               recv_counts [P,L] (from each source, per local expert)
              all-to-all the rows                 x_recv [R,H] ordered (source, local expert)
              regroup by local expert             x_sorted [R,H], tokens_per_local_expert [L]
    combine:  undo the regroup, all-to-all back (the reverse splits), then the local combine
              (weights, scatter-add into [T,H]) on the rows in the order they left.

The row exchanges are autograd-aware (the backward of an all-to-all is the reverse all-to-all),
uneven splits and ranks that send or receive nothing are ordinary cases. The local sort and
combine are the single-device ``LocalDispatcher``'s, so both paths sum in the same order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..moe.dispatch import LocalDispatcher, LocalState
from ..moe.layer import moe_layers


class AllToAllState(NamedTuple):
    local: LocalState  # how the sent rows map back to this rank's tokens
    regroup: torch.Tensor  # [R] received row of each x_sorted row
    send_splits: list[int]  # [P] rows sent to each rank
    recv_splits: list[int]  # [P] rows received from each rank


def group_by_local_expert(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts [P,L] -> [R] permutation taking rows ordered (source, expert) to (expert, source)."""
    sources, experts = recv_counts.shape
    expert_of_row = torch.arange(experts, device=recv_counts.device).repeat(sources)
    expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # [R]
    return torch.argsort(expert_of_row, stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class AllToAllDispatcher:
    """The MoE dispatcher contract (see ``ernie45.moe.dispatch``) across the ranks of ``ep_group``."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup):
        ranks = ep_group.size()
        if num_experts % ranks:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ranks}")
        self.num_experts = num_experts
        self.group = ep_group
        self.ranks = ranks
        self.local_experts = num_experts // ranks
        self.local = LocalDispatcher(num_experts)

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        x_send, counts, local_state = self.local.dispatch(x, topk_idx, topk_weight, keep)  # [S,H], [E]
        recv_counts = funcol.all_to_all_single(counts, None, None, self.group)  # [P*L], equal splits
        recv_counts = recv_counts.view(self.ranks, self.local_experts)  # [P,L]
        # NOTE: the split sizes must be host integers: one device-to-host copy per layer.
        send_splits = counts.view(self.ranks, self.local_experts).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        x_recv = funcol.all_to_all_single_autograd(x_send, recv_splits, send_splits, self.group)  # [R,H]
        regroup = group_by_local_expert(recv_counts)
        x_sorted = x_recv[regroup]
        state = AllToAllState(local_state, regroup, send_splits, recv_splits)
        return x_sorted, recv_counts.sum(0), state

    def combine(self, y_sorted: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        y_recv = y_sorted[inverse_permutation(state.regroup)]  # [R,H] back in (source, expert) order
        y_back = funcol.all_to_all_single_autograd(y_recv, state.send_splits, state.recv_splits, self.group)
        return self.local.combine(y_back, state.local)  # [T,H]

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(num_experts={self.num_experts}, ep={self.ranks})"


def shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replace each expert parameter [E,...] by a ``Shard(0)`` DTensor over ``ep_mesh``."""
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts over ``ep_mesh`` and install the all-to-all dispatcher."""
    for mlp in moe_layers(model).values():
        num_experts = mlp.experts.gate_up_proj.shape[0]
        shard_experts(mlp.experts, ep_mesh)
        mlp.dispatcher = AllToAllDispatcher(num_experts, ep_mesh.get_group())
