"""Scale-out on torch.distributed: device meshes, FSDP2, tensor, expert and pipeline parallelism,
activation checkpointing, and HF checkpoints loaded straight into sharded models.

Typical use (under ``torchrun``)::

    from ernie45 import from_pretrained
    from ernie45.distributed import ParallelConfig
    model = from_pretrained(path, dtype=torch.bfloat16, parallel=ParallelConfig(ep=8))
    ...
    model.save_pretrained(out_dir)   # collective: gathers onto rank 0, the files a single-process save writes

Or wrap a model you built yourself with ``parallelize_model(model, ParallelConfig(...))``.
With ``pp > 1`` each rank holds its pipeline stages only and trains through ``model.pipeline``::

    model = from_pretrained(path, parallel=ParallelConfig(pp=2, pp_schedule="Interleaved1F1B"))
    out = model.pipeline.step(input_ids, labels, loss_divisor=label_tokens)  # forward + backward
    model.pipeline.reduce_tied_gradients()                                    # tied embeddings only

Model code never imports this package: everything here wraps models from outside.
"""

from .activation_checkpoint import apply_activation_checkpointing
from .config import LayoutError, ParallelConfig, check_model_fits, plan_stages
from .context_parallel import SequenceShard, apply_context_parallel, context_parallel_refusal, gather_sequence, shard_sequence
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel
from .fsdp import apply_fsdp, prepare_for_final_backward, prepare_for_grad_accumulation
from .loading import from_pretrained
from .mesh import ParallelMeshes, build_meshes, ensure_process_group
from .parallelize import parallelize_model
from .pipeline import Pipeline, StepLosses
from .pipeline_split import StageSplit
from .tensor_parallel import apply_tensor_parallel

__all__ = [
    "AllToAllDispatcher",
    "LayoutError",
    "ParallelConfig",
    "ParallelMeshes",
    "Pipeline",
    "SequenceShard",
    "StageSplit",
    "StepLosses",
    "apply_activation_checkpointing",
    "apply_context_parallel",
    "context_parallel_refusal",
    "apply_expert_parallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_meshes",
    "check_model_fits",
    "ensure_process_group",
    "from_pretrained",
    "gather_sequence",
    "parallelize_model",
    "plan_stages",
    "prepare_for_final_backward",
    "prepare_for_grad_accumulation",
    "shard_sequence",
]
