"""Tensor parallelism (Megatron-style) with ``parallelize_module`` on the ``tp`` mesh.

Per block: q/k/v colwise (each rank holds nH/tp query heads and nKV/tp key/value heads; the
attention module reads its head count off the projection width), o rowwise; the dense MLP and
MoE shared experts gate/up colwise, down rowwise. One all-reduce after o_proj and one after
down_proj, activations between blocks stay plain replicated tensors. The router and norms are
replicated (their gradients are identical on every tp rank); routed experts are not split by tp
(replicated, or split by ep, see expert_parallel.py).

Vocabulary: the embedding is row-parallel (vocab-sharded, masked lookup, all-reduce) and the LM
head colwise, so a tied weight is the same ``Shard(0)`` DTensor in both. Logits come back as a
full plain tensor unless ``sharded_logits`` asks for the vocab-sharded DTensor (for
``torch.distributed.tensor.parallel.loss_parallel``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .model_parts import decoder_blocks, is_tied, moe_layer


def swiglu_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The TP plan of one decoder block (dense or MoE)."""
    plan: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
    }
    mlp = moe_layer(block)
    if mlp is None:
        plan.update(swiglu_plan("mlp"))
    elif getattr(mlp, "shared_experts", None) is not None:
        plan.update(swiglu_plan("mlp.shared_experts"))
    return plan


def vocab_plan(sharded_logits: bool = False) -> dict[str, ParallelStyle]:
    """The TP plan of the embedding (row-parallel: vocab-sharded) and the LM head (colwise)."""
    head = ColwiseParallel(
        output_layouts=Shard(-1) if sharded_logits else Replicate(),
        use_local_output=not sharded_logits,
    )
    return {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()), "lm_head": head}


def holds(model: nn.Module, name: str) -> bool:
    """Whether ``model`` holds submodule ``name`` (pipeline stages set the others' to None)."""
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, leaf, None) is not None


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sharded_logits: bool = False) -> None:
    """Shard ``model`` in place over ``tp_mesh``."""
    for block in decoder_blocks(model):
        parallelize_module(block, tp_mesh, block_plan(block))
    # NOTE: a pipeline stage may hold neither (other stages hold the embedding and the head).
    held = {name: style for name, style in vocab_plan(sharded_logits).items() if holds(model, name)}
    parallelize_module(model, tp_mesh, held)
    if is_tied(model):
        model.tie_weights()  # the head's fresh DTensor is replaced by the (equally sharded) embedding
