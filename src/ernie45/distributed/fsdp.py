"""FSDP2 (``fully_shard``) for the dense and MoE causal LMs, and gradient-accumulation control.

Groups (each all-gathered just before it runs and freed after):
  * every decoder block, over the data-parallel mesh;
  * inside MoE blocks, the routed experts over ``ep_shard`` (they are already split over ``ep``;
    done whenever ep > 1, even without other data parallelism, for the gradient scale) and the
    router in its own fp32 group, so ``param_dtype=bf16`` never rounds its weight;
  * untied embedding and LM head, each on its own; a tied pair stays in the root group, which
    is gathered for the whole forward (the weight is used at both ends);
  * the root (final norm and whatever is left); under pipeline parallelism each of this rank's
    stages is a root instead (the model's own forward never runs), and the embedding, final norm
    and LM head each get their own group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .mesh import ParallelMeshes
from ..models.linear import set_prepacking
from ..moe.layer import moe_layers
from .model_parts import decoder_blocks, is_tied, moe_layer

# NOTE: the router computes in fp32 itself; casting its inputs would change the dtype it hands
# back (routing weights follow the activations' dtype), so inputs pass through untouched.
ROUTER_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(model: nn.Module, meshes: ParallelMeshes, stages: list[nn.Module] | None = None) -> None:
    """Shard ``model`` in place with ``fully_shard`` (a no-op without data or expert parallelism).

    ``stages``: this rank's pipeline stages (pp > 1), made the FSDP2 roots.
    """
    parallel, dp = meshes.parallel, meshes.dp
    policy = MixedPrecisionPolicy(param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype)
    shard = dict(mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
    if meshes.experts is not None:
        for mlp in moe_layers(model).values():
            fully_shard_experts(mlp.experts, meshes, shard)
    if dp is None:
        return
    set_prepacking(model, False)  # NOTE: a packed copy of a gathered weight would undo the sharding
    for block in decoder_blocks(model):
        mlp = moe_layer(block)
        if mlp is not None:
            fully_shard(mlp.gate, mesh=dp, mp_policy=ROUTER_POLICY, reshard_after_forward=parallel.reshard_after_forward)
        fully_shard(block, mesh=dp, **shard)
    if stages is not None:
        shard_stages(model, stages, dp, shard)
        return
    if not is_tied(model):
        fully_shard(model.model.embed_tokens, mesh=dp, **shard)
        fully_shard(model.lm_head, mesh=dp, **shard)
    fully_shard(model, mesh=dp, **shard)


def shard_stages(model: nn.Module, stages: list[nn.Module], dp, shard: dict) -> None:
    """Pipeline stages as roots, whatever they hold besides blocks in groups of its own.

    NOTE: a stage root's own group would hold tensors of the model's modules, which the model's
    ``to_empty`` (loading) cannot reach through FSDP2; so the roots hold no tensors themselves.
    The routing statistics a stage receives stay fp32: the roots cast no inputs.
    """
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        if module is not None:
            fully_shard(module, mesh=dp, **shard)
    policy = shard["mp_policy"]
    root_policy = MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype, cast_forward_inputs=False)
    for stage in stages:
        fully_shard(stage, mesh=dp, mp_policy=root_policy, reshard_after_forward=shard["reshard_after_forward"])


def fully_shard_experts(experts: nn.Module, meshes: ParallelMeshes, shard: dict) -> None:
    """FSDP2 over ``ep_shard`` for experts already split over ``ep``, with the right gradient scale.

    Each expert's gradient sums the tokens of all its ep peers (and, under tp, every tp peer sends
    the same tokens), so averaging over the ep_shard ranks alone would be too large by ep: divide
    by all the ranks of the experts mesh. This is needed even with one ep_shard rank.
    """
    parallel = meshes.parallel
    fully_shard(experts, mesh=meshes.ep_shard, **shard)
    experts.set_gradient_divide_factor(float(parallel.ep_shard * parallel.ep))
    if parallel.ep_shard > 1 and dist.get_backend(meshes.ep_shard.get_group()) != "nccl":
        # NOTE: a custom factor means a PREMUL_SUM reduce-scatter, which only NCCL has; with one
        # rank there is no reduce-scatter (and forcing sums would divide twice).
        experts.set_force_sum_reduction_for_comms(True)


def _set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    # NOTE: every FSDP group, including expert groups that may be roots of their own (ep without dp).
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


def prepare_for_grad_accumulation(model: nn.Module) -> None:
    """Call before the backward of every micro-batch but the last: gradients stay local and
    unsharded, so no reduce-scatter runs until ``prepare_for_final_backward``."""
    _set_gradient_sync(model, False)


def prepare_for_final_backward(model: nn.Module) -> None:
    """Call before the last micro-batch's backward: it reduce-scatters the accumulated gradients."""
    _set_gradient_sync(model, True)
