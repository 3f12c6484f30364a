"""``ernie45 plan``: which parallel layouts fit a model on N GPUs, the memory each GPU needs, and
how fast a step should run, computed from the model's own accounting (no GPU, no weights).

How each number is obtained (T tokens per micro-batch on a rank, H hidden, V vocabulary):

  layouts       every dp_replicate x dp_shard x cp x tp x ep x pp that ``ParallelConfig``,
                ``resolve`` and ``check_model_fits`` accept for the GPU count (so "valid" is what
                ``parallelize_model`` accepts), activation checkpointing off/on, and every
                micro-batch that divides the per-rank batch. Pipelines: the default 1F1B schedule,
                one stage per rank, the layers of each stage from ``plan_stages``; the micro-batch
                is ``pp_microbatch_size`` and the whole per-rank batch runs in one schedule step.
  parameters    EXACT: each parameter of a meta-device model, split as our code splits it (TP
  gradients     plan of ``distributed.tensor_parallel``, experts Shard(0) over ep, FSDP2 dim-0
  optimizer     chunks padded to ceil(dim0/n) over dp_shard x cp, experts over ep_shard); fp32
                master weights and gradients, AdamW's exp_avg + exp_avg_sq on the unpadded shard
                (its scalar ``step`` lives on the host). Checked against real gloo layouts in
                tests/test_planner.py.
  accumulation  micro-batches > 1 under FSDP2: the recipe defers the reduce-scatter to the last
                micro-batch, so every rank keeps its unsharded gradients in fp32 meanwhile (and
                under pp also the gathered weights: PipelineStage does not reshard between them).
  activations   what the model code saves for backward, per layer (within 2.5% of what a CPU forward
                keeps in tests/test_planner.py, fp32, bf16 and LoRA; the cp and pp cases are derived):
                norms keep x + fp32 rstd, attention keeps q, k, v, out + fp32 logsumexp (a fused
                kernel: no [S,S] scores), feed-forwards keep gate and up (and the SwiGLU output
                under tp or an adapter on down_proj), MoE layers keep the routed rows (x_sorted,
                gate_up, y; act only with an adapter on the experts' down_proj), fp32 router
                probabilities and logits,
                and int64 routing indices; with checkpointing only each block's input (plus the
                MoE routing record). Plus the fused loss's gradients held until backward. A 1F1B
                stage holds (pp - stage) micro-batches at once (not measured: derived).
  transient     the largest of: FSDP2 buffers of the biggest block in backward (gathered params,
                their gradients, the fp32 reduce-scatter input, the next block prefetched) plus
                one layer's backward working set (two with checkpointing: the recomputed block);
                the loss (gathered head, logits chunk); foreach AdamW's sqrt temporary.
  all_to_all    EP send + receive buffers of one MoE layer (balanced routing assumed).
  runtime       a fixed 2 GiB for the CUDA context, NCCL and cuBLAS workspaces.
  step time     FLOPs (``accounting``; x 8/6 for recomputed blocks; 4/6 of the matmuls for LoRA)
                / (peak x efficiency), plus communication volume / bandwidth: FSDP2 all-gathers
                (forward and backward, every micro-batch) and the fp32 reduce-scatter (once), HSDP
                all-reduce, EP all-to-all (4 per MoE layer, 6 with recompute), TP all-reduces and
                the logits all-gather, CP K/V all-gathers, PP hidden states. FSDP traffic is assumed
                to overlap with compute, the others not: step = (max(compute, fsdp) + ep + tp + cp
                + pp) x (n + pp - 1) / n for n micro-batches (the pipeline bubble); the slowest
                stage and the fullest rank are shown.

Everything but the exact parameter/gradient/optimizer bytes is an estimate: memory peaks are
summed (conservative: gradients and activations never peak together), routing is assumed
balanced, and the efficiency is a guess the user should replace with a measured one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from transformers import Ernie4_5_MoeConfig, Ernie4_5Config

from .checkpoint.hf_checkpoint import load_config
from .checkpoint.hub import looks_like_hub_id
from .distributed.config import LayoutError, ParallelConfig, check_model_fits, plan_stages
from .distributed.model_parts import decoder_blocks, is_tied, moe_layer
from .distributed.tensor_parallel import block_plan, vocab_plan
from .models.accounting import flops_per_token
from .models.dimensions import head_dim_of, kv_heads_of
from .models.registry import model_class_for
from .moe.config import is_moe_layer
from .peft import LoRALinear, PeftConfig, apply_lora

GIB = 2**30
GB = 10**9
RUNTIME_RESERVE = 2 * GIB  # CUDA context, NCCL buffers, cuBLAS workspaces
LOSS_CHUNK = 1024  # FusedLinearCrossEntropy's default chunk_size
SIZES = ("dp_replicate", "dp_shard", "cp", "tp", "ep", "pp")


# ----- hardware ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """peak_tflops: dense bf16 tensor-core peak (no sparsity). memory: what the device reports.
    bandwidth / inter_node_bandwidth: GB/s per GPU that a ring collective reaches inside a node
    (NVLink or PCIe) and between nodes (one NIC per GPU): assumptions, override them."""

    name: str
    peak_tflops: float
    memory: int
    bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int = 8


MIB = 2**20
GPUS = {
    "H100": GPUSpec("H100 SXM 80GB", 989.0, 81559 * MIB, 360.0, 40.0),
    "H200": GPUSpec("H200 SXM 141GB", 989.0, 143771 * MIB, 360.0, 40.0),
    "A100-80GB": GPUSpec("A100 SXM 80GB", 312.0, 81920 * MIB, 230.0, 20.0),
    "A100-40GB": GPUSpec("A100 SXM 40GB", 312.0, 40960 * MIB, 230.0, 20.0),
    "L40S": GPUSpec("L40S 48GB (PCIe)", 362.0, 46068 * MIB, 20.0, 10.0),
}

_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "g": GB, "tb": 10**12, "kib": 2**10, "mib": MIB, "gib": GIB, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB' (10^9 bytes), '80GiB', '81559MiB', '0.5TB' -> bytes; anything else is a ValueError."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"--gpu-memory {text!r} is not a memory size; write e.g. 80GB (10^9 bytes), 80GiB or 81559MiB")
    value = float(match.group(1)) * unit
    if value <= 0:
        raise ValueError(f"--gpu-memory {text!r} must be more than 0")
    return int(value)


def gpu_spec(name: str) -> GPUSpec:
    key = {k.lower(): k for k in GPUS}.get(name.lower().replace(" ", "-"))
    if key is None:
        raise ValueError(f"--gpu {name!r} is not a known GPU; choose one of {', '.join(GPUS)} (or set --peak-tflops/--gpu-memory)")
    return GPUS[key]


# ----- the model ---------------------------------------------------------------------------------
# The released configs (config.json of baidu/ERNIE-4.5-*-PT; see /work/shared/DESIGN.md section 3).
_COMMON = dict(vocab_size=103424, head_dim=128, max_position_embeddings=131072, use_bias=False)
PRESETS = {
    "0.3b": lambda: Ernie4_5Config(
        **_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "21b-a3b": lambda: Ernie4_5_MoeConfig(
        **_COMMON, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=27, tie_word_embeddings=True,
    ),
    "300b-a47b": lambda: Ernie4_5_MoeConfig(
        **_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, moe_num_experts=64, moe_k=8, moe_intermediate_size=3584, moe_num_shared_experts=0,
        moe_layer_start_index=3, moe_layer_end_index=53, tie_word_embeddings=False,
    ),
}


def resolve_model_config(model):
    """A preset name, a local HF checkpoint directory, a hub id already in the local HF cache, or a
    transformers config -> the transformers config (never downloads)."""
    if not isinstance(model, str):
        return model
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]()
    if Path(model).exists():
        return load_config(model)
    if looks_like_hub_id(model):
        return load_config(_cached_hub_snapshot(model))
    raise ValueError(
        f"--model {model!r} is not a preset ({', '.join(PRESETS)}), an existing checkpoint directory or a hub id"
    )


def _cached_hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise ValueError(
            f"--model {repo_id!r}: no config.json of it in the local Hugging Face cache (plan never downloads); "
            f"run `hf download {repo_id} config.json` or pass a preset ({', '.join(PRESETS)}) or a directory"
        )
    return Path(found).parent


@dataclass(frozen=True)
class ParamSpec:
    """One parameter and how our code splits it."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # dimension split over tp (None: replicated over tp)
    expert: bool  # routed experts: dim 0 over ep, FSDP2 over ep_shard
    unit: str  # the FSDP2 group it is gathered with: a block "layers.i", "embed", "head" or "root"
    keep_fp32: bool  # the model keeps it fp32 whatever the compute dtype (router weight)
    trainable: bool  # False: a frozen LoRA base weight


def _style_dims(style: ParallelStyle, module: nn.Module) -> dict[str, int | None]:
    """Which dim of each of ``module``'s parameters a TP style shards (torch's rules)."""
    embedding = isinstance(module, nn.Embedding)
    if type(style) is ColwiseParallel:
        return {"weight": 1 if embedding else 0, "bias": 0}
    if type(style) is RowwiseParallel:
        return {"weight": 0 if embedding else 1, "bias": None}
    raise NotImplementedError(f"the planner does not know how {type(style).__name__} shards {type(module).__name__}")


def _tp_dims(model: nn.Module) -> dict[str, int | None]:
    """Full parameter name -> TP-sharded dim, from the plans ``apply_tensor_parallel`` applies."""
    plans = [(f"model.layers.{i}.", block, block_plan(block)) for i, block in enumerate(decoder_blocks(model))]
    plans.append(("", model, vocab_plan()))
    dims: dict[str, int | None] = {}
    for prefix, root, plan in plans:
        for path, style in plan.items():
            module = root.get_submodule(path)
            for pname, dim in _style_dims(style, module).items():
                if getattr(module, pname, None) is not None:
                    dims[f"{prefix}{path}.{pname}"] = dim
    return dims


def _unit(name: str, model: nn.Module) -> str:
    """The FSDP2 group (``distributed.fsdp.apply_fsdp``) that gathers ``name``."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if match:
        return f"layers.{match.group(1)}"
    if not is_tied(model) and name.startswith("model.embed_tokens."):
        return "embed"
    if not is_tied(model) and name.startswith("lm_head."):
        return "head"
    return "root"


def param_specs(model: nn.Module) -> list[ParamSpec]:
    """Every parameter of ``model`` (e.g. built on the meta device) with its splitting rules."""
    tp_dims = _tp_dims(model)
    experts = {id(p) for block in decoder_blocks(model) if moe_layer(block) for p in moe_layer(block).experts.parameters()}
    return [
        ParamSpec(
            name=name,
            shape=tuple(p.shape),
            tp_dim=tp_dims.get(name),
            expert=id(p) in experts,
            unit=_unit(name, model),
            keep_fp32=name.endswith("mlp.gate.weight"),
            trainable=p.requires_grad,
        )
        for name, p in model.named_parameters()
    ]


# --method lora: attention, dense MLPs, shared and routed experts (not the router or the LM head).
LORA_TARGETS = ["*.self_attn.*_proj", "*.mlp.*_proj", "*.mlp.experts"]


def meta_model(config, lora_rank: int | None = None) -> nn.Module:
    """The model on the meta device (no memory), with ``ernie45.peft`` adapters of ``lora_rank``
    (fp32, the base frozen) when given: its parameter shapes, TP plan and trainable set."""
    model = model_class_for(config).from_config(config, device="meta", dtype=torch.float32)
    if lora_rank is not None:
        apply_lora(model, PeftConfig(target_modules=LORA_TARGETS, dim=lora_rank, lora_dtype=torch.float32))
    return model


# ----- per-rank bytes of parameters, gradients and optimizer state (exact) -----------------------
def _fsdp_on(layout: ParallelConfig) -> bool:
    """Whether FSDP2 shards the dense parameters (``ParallelMeshes.dp`` exists)."""
    return layout.data_parallel * layout.cp > 1


def fsdp_group(spec: ParamSpec, layout: ParallelConfig) -> int | None:
    """Ranks FSDP2 shards ``spec`` over (None: not managed by FSDP2)."""
    if spec.expert and layout.ep > 1:
        return layout.ep_shard
    return layout.dp_shard * layout.cp if _fsdp_on(layout) else None


def local_numel(spec: ParamSpec, layout: ParallelConfig, shard_index: int = 0) -> tuple[int, int, int]:
    """(unsharded-local, padded shard, real shard) elements on the rank at FSDP2 index ``shard_index``.

    NOTE: FSDP2 splits dim 0 of the tensor TP/EP left on the rank into ceil(dim0/n) rows per rank and
    allocates that padded size on every rank, the last ranks holding fewer (or no) real rows.
    """
    shape = list(spec.shape)
    if spec.tp_dim is not None and layout.tp > 1:
        shape[spec.tp_dim] //= layout.tp
    if spec.expert and layout.ep > 1:
        shape[0] //= layout.ep
    full = math.prod(shape)
    n = fsdp_group(spec, layout)
    if n is None:
        return full, full, full
    rest = full // shape[0] if shape[0] else 0
    chunk = -(-shape[0] // n)
    real = max(0, min(chunk, shape[0] - shard_index * chunk))
    return full, chunk * rest, real * rest


@dataclass(frozen=True)
class StateBytes:
    parameters: int
    gradients: int
    optimizer: int
    accumulation: int  # unsharded fp32 gradients kept between micro-batches (FSDP2 without sync)


def state_bytes(
    specs: list[ParamSpec], layout: ParallelConfig, compute_bytes: int = 2, dp_index: int = 0, ep_index: int = 0,
) -> StateBytes:
    """Bytes one rank holds (``dp_index``: its dp_shard x cp coordinate, ``ep_index``: its ep_shard one).

    Trained tensors: fp32 weights and gradients (padded shards), AdamW moments on the real shard,
    unsharded fp32 gradients while micro-batches accumulate. Frozen LoRA base weights are stored in
    the compute dtype (those the model keeps fp32 stay fp32).
    """
    params = grads = optim = accumulate = 0
    for spec in specs:
        full, padded, real = local_numel(spec, layout, ep_index if spec.expert and layout.ep > 1 else dp_index)
        if not spec.trainable:
            params += (4 if spec.keep_fp32 else compute_bytes) * padded
            continue
        params, grads, optim = params + 4 * padded, grads + 4 * padded, optim + 8 * real
        accumulate += 4 * full if fsdp_group(spec, layout) is not None else 0
    return StateBytes(params, grads, optim, accumulate)


# ----- activations (bytes held from forward to backward) ----------------------------------------
@dataclass(frozen=True)
class Precision:
    """compute: bytes per activation and per gathered weight; residual: the residual stream's (fp32
    under autocast, where the embedding and the sums stay fp32); mode: how the recipe mixes them."""

    compute: int
    residual: int
    mode: str


def precision(dtype: str, method: str, layout: ParallelConfig) -> Precision:
    """As the recipe does it: FSDP2 casts gathered weights (several data-parallel ranks), otherwise
    ``torch.autocast`` over fp32 masters; LoRA computes in the dtype of its frozen base."""
    if dtype == "fp32":
        return Precision(4, 4, "fp32")
    if _fsdp_on(layout) or method == "lora":
        return Precision(2, 2, "bf16")
    return Precision(2, 4, "bf16 autocast")


@dataclass(frozen=True)
class Workload:
    """What is trained: sequence length, global batch (sequences per optimizer step), full or LoRA
    fine-tuning (adapter rank), compute dtype, and the loss ("fused": FusedLinearCrossEntropy
    wherever the recipe allows it, i.e. tp == 1; "masked": full logits)."""

    seq_len: int = 4096
    global_batch: int = 128
    method: str = "full"
    lora_rank: int = 16
    dtype: str = "bf16"
    loss: str = "fused"


class Dims(NamedTuple):
    """The config values the planner reads, copied once (a transformers config's attribute access is
    slow, and the planner reads them for every layer of every candidate)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config) -> "Dims":
        values = {name: getattr(config, name) for name in cls._fields}
        return cls(**values | dict(num_key_value_heads=kv_heads_of(config), head_dim=head_dim_of(config)))


@dataclass(frozen=True)
class ModelInfo:
    """What the planner reads off the meta-device model, once."""

    config: Dims
    moe: object  # MoEConfig, or None for a dense model
    specs: tuple[ParamSpec, ...]
    parameters: int  # as transformers counts them (model.num_parameters()), adapters excluded
    active: int  # those one token uses
    adapters: tuple["LayerAdapters", ...]  # per decoder layer
    router_trained: bool
    moe_flags: tuple[bool, ...]  # which layers are MoE layers
    matmul_flops: int  # training FLOPs per token of the weights (accounting.flops_per_token at length 0)
    attention_flops: int  # ... of attention scores, per token and key position
    hf_config: object  # the transformers config itself (for the pipeline split)
    # What one rank runs: all of it, or one pipeline stage (its decoder layers, whether it holds the
    # embedding / the final norm and LM head, and its share of the model's matmul cost).
    layers: tuple[int, ...] = ()
    first: bool = True
    last: bool = True
    share: float = 1.0

    @classmethod
    def of(cls, config, lora_rank: int | None = None) -> "ModelInfo":
        model = meta_model(config, lora_rank)
        config, moe = model.config, model.moe_config
        counts = model.num_parameters(), model.num_parameters(active_only=True)
        specs = tuple(param_specs(model))
        router = any(s.trainable for s in specs if s.keep_fp32)
        layers = tuple(range(config.num_hidden_layers))
        flags = tuple(moe is not None and is_moe_layer(config, i) for i in layers)
        matmul = flops_per_token(config, 0, moe)
        flops = (matmul, flops_per_token(config, 1, moe) - matmul)
        adapters = _adapters_per_layer(model)
        return cls(Dims.of(config), moe, specs, *counts, adapters, router, flags, *flops, config, layers)

    def is_moe(self, layer: int) -> bool:
        return self.moe_flags[layer]

    def stages(self, layout: ParallelConfig) -> list["ModelInfo"]:
        """What each pipeline rank runs under ``layout`` (one stage per rank: 1F1B/GPipe)."""
        if layout.pp == 1:
            return [self]
        split = plan_stages(layout, self.hf_config, self.moe)
        total = sum(split.costs)
        views = []
        for stage, layers in enumerate(split.layers):
            first, last = stage == 0, stage == split.num_stages - 1
            specs = tuple(spec for spec in _stage_specs(self.specs, set(layers), first, last))
            views.append(dataclasses.replace(
                self, specs=specs, layers=tuple(layers), first=first, last=last, share=split.costs[stage] / total,
            ))  # fmt: skip
        return views


def _stage_specs(specs, layers: set[int], first: bool, last: bool) -> Iterator[ParamSpec]:
    """A pipeline stage's parameters: its blocks, the embedding on the first, the final norm and LM
    head on the last (a tied head is a copy of the embedding there); each its own FSDP2 group."""
    for spec in specs:
        match = re.match(r"model\.layers\.(\d+)\.", spec.name)
        if match:
            if int(match.group(1)) in layers:
                yield spec
        elif spec.name.startswith("model.embed_tokens."):
            if first:
                yield dataclasses.replace(spec, unit="embed")
            if last and spec.unit == "root":  # NOTE: tied: the last stage holds its own copy as the head
                yield dataclasses.replace(spec, name="lm_head.weight", unit="head")
        elif last:
            yield dataclasses.replace(spec, unit="norm" if spec.name.startswith("model.norm") else "head")


class LayerAdapters(NamedTuple):
    """The LoRA adapters of one decoder block."""

    linears: int  # adapted linear layers
    rank: int
    linear_numel: int  # their A and B elements
    expert_projections: int  # adapted routed-expert projections (0, or 2: gate_up and down)
    ffn_down_adapted: bool  # the feed-forward's (dense or shared-expert) down_proj has an adapter
    expert_down_adapted: bool  # the routed experts' down_proj has an adapter


def _adapters_per_layer(model: nn.Module) -> tuple[LayerAdapters, ...]:
    counts = []
    for block in decoder_blocks(model):
        linears = [m for m in block.modules() if isinstance(m, LoRALinear)]
        mlp = moe_layer(block)
        rank = linears[0].lora_A.weight.shape[0] if linears else 0
        numel = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in linears)
        experts = len(mlp.experts.lora_scales) if mlp is not None else 0
        expert_down = mlp is not None and "down_proj" in mlp.experts.lora_scales
        ffn_down = any(name.endswith("down_proj") for name, m in block.named_modules() if isinstance(m, LoRALinear))
        counts.append(LayerAdapters(len(linears), rank, numel, experts, ffn_down, expert_down))
    return tuple(counts)


@dataclass(frozen=True)
class Work:
    """One rank's share of a micro-batch: ``tokens`` it computes, ``keys`` each attention layer
    keeps (all the sequence's tokens under cp), ``rows`` of the micro-batch."""

    tokens: int
    keys: int
    rows: int


def attention_bytes(config, work: Work, tp: int, prec: Precision) -> int:
    """Norms keep x and fp32 rstd; sdpa keeps q, k, v, out and fp32 logsumexp (o_proj's input is a
    view of out); post-attention norm keeps the residual sum."""
    heads, kv = config.num_attention_heads // tp, kv_heads_of(config) // tp
    hd, h = head_dim_of(config), config.hidden_size
    per_token = prec.residual * 2 * h + prec.compute * (2 * h + 2 * heads * hd) + 4 * (2 + heads)
    return work.tokens * per_token + work.keys * prec.compute * 2 * kv * hd


def swiglu_bytes(tokens: int, width: int, prec: Precision, output_kept: bool) -> int:
    """gate_proj/up_proj outputs (kept by _SwiGLU, or by _SwiGLUDown, which makes the SwiGLU output
    again in backward) and, where down_proj is called as a module (``output_kept``: tensor parallel
    or adapted), its input."""
    return tokens * prec.compute * (3 if output_kept else 2) * width


def ffn_output_kept(info: ModelInfo, layer: int, layout: ParallelConfig) -> bool:
    """Whether a feed-forward keeps its SwiGLU output: its down_proj is tensor parallel (hooked by
    RowwiseParallel) or carries an adapter (see ``models.mlp._runs_as_plain_linear``)."""
    return layout.tp > 1 or info.adapters[layer].ffn_down_adapted


def moe_bytes(info: ModelInfo, layer: int, work: Work, layout: ParallelConfig, prec: Precision) -> int:
    """Routed rows x_sorted [TK,H], gate_up [TK,2I], y [TK,H] and the weights [TK] (and the SwiGLU
    output act [TK,I] where the experts' down_proj is adapted: otherwise it is made again); fp32
    router probs (saved) and logits (the layer's record), renormalised weights; int64 top-k, sort
    order, token index (+ two permutations under ep); shared experts.
    A trained router also keeps the fp32 copy of its input (when activations are not fp32)."""
    moe, t = info.moe, work.tokens
    k, e, h = moe.n_activated_experts, moe.n_routed_experts, moe.dim
    widths = 3 if info.adapters[layer].expert_down_adapted else 2  # gate, up (+ act): moe.experts._GroupedSwiGLUDown
    routed = t * k * prec.compute * (2 * h + widths * moe.moe_inter_dim + 1)
    router_input = t * 4 * h if prec.compute != 4 and info.router_trained else 0
    router = t * 4 * (2 * e + k + 2) + router_input
    indices = t * k * 8 * (5 if layout.ep > 1 else 3)
    kept = ffn_output_kept(info, layer, layout)
    shared = swiglu_bytes(t, moe.shared_inter_dim // layout.tp, prec, kept) if moe.n_shared_experts else 0
    return routed + router + indices + shared


def adapter_bytes(info: ModelInfo, layer: int, work: Work, layout: ParallelConfig, prec: Precision) -> int:
    """LoRA keeps each adapter's [T,r] low-rank product (experts: [TK,r] per projection, the rank
    padded to 16 bytes as the grouped kernel pads it) and the compute-dtype copies of the fp32
    adapters (experts: the padded copies, E/ep per rank)."""
    adapters = info.adapters[layer]
    if not (adapters.linears or adapters.expert_projections):
        return 0
    cast = prec.compute != 4
    kept = work.tokens * adapters.rank * adapters.linears + (adapters.linear_numel if cast else 0)
    if adapters.expert_projections:
        moe = info.moe
        padded = -(-adapters.rank * prec.compute // 16) * 16 // prec.compute
        kept += work.tokens * moe.n_activated_experts * padded * adapters.expert_projections
        if cast or padded != adapters.rank:  # NOTE: [E,r,in] and [E,out,r] of gate_up [E,2I,H] and down [E,H,I]
            kept += moe.n_routed_experts // layout.ep * padded * (2 * moe.dim + 3 * moe.moe_inter_dim)
    return prec.compute * kept


def checkpointed_layer_bytes(info: ModelInfo, layer: int, work: Work, prec: Precision) -> int:
    """A recomputed block keeps its input, and an MoE block its routing record (fp32 logits and
    probs) and the top-k indices that the recompute replays."""
    kept = work.tokens * prec.residual * info.config.hidden_size
    if info.is_moe(layer):
        kept += work.tokens * (4 * 2 * info.moe.n_routed_experts + 8 * info.moe.n_activated_experts)
    return kept


def layer_bytes(info: ModelInfo, layer: int, work: Work, layout: ParallelConfig, prec: Precision) -> int:
    """Everything one decoder block keeps for backward without checkpointing."""
    if info.is_moe(layer):
        ffn = moe_bytes(info, layer, work, layout, prec)
    else:
        kept = ffn_output_kept(info, layer, layout)
        ffn = swiglu_bytes(work.tokens, info.config.intermediate_size // layout.tp, prec, kept)
    return attention_bytes(info.config, work, layout.tp, prec) + ffn + adapter_bytes(info, layer, work, layout, prec)


def work_of(layout: ParallelConfig, micro_batch: int, seq_len: int) -> Work:
    """A rank's share of one micro-batch (cp pads the sequence to a multiple of 2 x cp)."""
    padded = -(-seq_len // (2 * layout.cp)) * 2 * layout.cp if layout.cp > 1 else seq_len
    return Work(tokens=micro_batch * padded // layout.cp, keys=micro_batch * padded, rows=micro_batch)


# ----- one layout: memory per GPU ----------------------------------------------------------------
def is_fused(layout: ParallelConfig, workload: Workload) -> bool:
    return workload.loss == "fused" and layout.tp == 1


def _head_in_root(info: ModelInfo, layout: ParallelConfig) -> bool:
    """A tied head is FSDP2's root group, gathered (in the compute dtype) for the whole step; an
    untied one, or a pipeline's copy, is its own group that the fused loss gathers in fp32."""
    return info.config.tie_word_embeddings and _fsdp_on(layout) and layout.pp == 1


def loss_held_bytes(info: ModelInfo, work: Work, layout: ParallelConfig, prec: Precision, workload: Workload) -> int:
    """Fused loss: the gradients it computes in forward and holds until backward, [N,H] and [V,H]
    (in the head's dtype: the gathered fp32 master, or the unsharded bf16 root of a tied model; none
    for LoRA's frozen head). Masked: the full logits [T,V] (replicated under tp) and their fp32
    log-softmax."""
    v, h = info.config.vocab_size, info.config.hidden_size
    if not is_fused(layout, workload):
        return work.tokens * v * (prec.compute + 4)
    head_gradient = 0 if workload.method == "lora" else v * h * (prec.compute if _head_in_root(info, layout) else 4)
    return work.tokens * (h * prec.compute + 8) + head_gradient


def autocast_copies(info: ModelInfo, layout: ParallelConfig, prec: Precision) -> int:
    """Under autocast every matmul weight is cast to bf16 once per forward and kept for backward."""
    if prec.mode != "bf16 autocast":
        return 0
    tied = info.config.tie_word_embeddings
    return sum(
        2 * local_numel(s, layout)[0]
        for s in info.specs
        if len(s.shape) >= 2 and not s.keep_fp32 and (tied or not s.name.startswith("model.embed_tokens"))
    )


def activation_bytes(
    info: ModelInfo, work: Work, layout: ParallelConfig, prec: Precision, ac: bool, workload: Workload, in_flight: int = 1,
) -> int:
    """Bytes held from the end of forward into backward on one rank (``in_flight`` micro-batches
    between their forward and backward on a pipeline stage; the last stage's loss is per micro-batch)."""
    config = info.config
    if ac:
        layers = sum(checkpointed_layer_bytes(info, i, work, prec) for i in info.layers)
    else:
        layers = sum(layer_bytes(info, i, work, layout, prec) for i in info.layers)
    h = config.hidden_size
    # the RoPE rotation (complex64, hd/2 per token, shared by the layers), token ids on the first stage
    inputs = work.tokens * (head_dim_of(config) * 4 + (8 if info.first else 0))
    cp_mask = work.tokens * (work.keys // work.rows) * (1 + prec.compute) if layout.cp > 1 else 0
    per_micro_batch = in_flight * (layers + inputs + cp_mask)
    if not info.last:
        return per_micro_batch + autocast_copies(info, layout, prec)
    final_norm = work.tokens * (prec.residual * h + 4 + prec.compute * h)  # its x, rstd and output
    return per_micro_batch + final_norm + loss_held_bytes(info, work, layout, prec, workload) + autocast_copies(info, layout, prec)


@dataclass(frozen=True)
class UnitSums:
    """Unsharded-local elements FSDP2 gathers: dense (over dp_shard x cp), experts (over ep_shard),
    the largest block (everything gathered while it runs), the root group; and the trained ones
    whose gradients are reduced (all of them in full fine-tuning, the adapters in LoRA)."""

    dense: int
    experts: int
    largest_block: int
    root: int
    trained_dense: int
    trained_experts: int


def unit_sums(info: ModelInfo, layout: ParallelConfig) -> UnitSums:
    sums = dict(dense=0, experts=0, root=0, trained_dense=0, trained_experts=0)
    blocks: dict[str, int] = {}
    for spec in info.specs:
        if fsdp_group(spec, layout) is None:
            continue
        full = local_numel(spec, layout)[0]
        kind = "experts" if spec.expert and layout.ep > 1 else "dense"
        sums[kind] += full
        sums[f"trained_{kind}"] += full if spec.trainable else 0
        sums["root"] += full if spec.unit == "root" else 0
        blocks[spec.unit] = blocks.get(spec.unit, 0) + full
    largest = max((n for unit, n in blocks.items() if unit.startswith("layers.")), default=0)
    return UnitSums(largest_block=largest, **sums)


_BACKWARD_WHAT = "backward: FSDP2 buffers of the largest block"


def transient_bytes(
    info: ModelInfo, work: Work, layout: ParallelConfig, prec: Precision, ac: bool, workload: Workload, sums: UnitSums,
) -> tuple[int, str]:
    """(bytes, what): the largest short-lived need on top of what is held."""
    config = info.config
    full = workload.method == "full"
    per_param = 3 * prec.compute + 4 if full else 2 * prec.compute  # params (+ grads, fp32 RS input) + prefetch
    fsdp = sums.largest_block * per_param + sums.root * prec.compute
    one_layer = max(layer_bytes(info, i, work, layout, prec) for i in info.layers)
    backward = fsdp + one_layer * (2 if ac else 1)
    if not info.last:
        return backward, _BACKWARD_WHAT + (" + its recompute" if ac else "") + " + its gradients"
    v, h = config.vocab_size, config.hidden_size
    if is_fused(layout, workload):
        own_group = _fsdp_on(layout) and not _head_in_root(info, layout)
        gathered = v * h * (4 if full else prec.compute) if own_group else 0
        low = prec.compute != 4  # NOTE: bf16 logits are cast to fp32 and the gradient back
        chunk = min(LOSS_CHUNK, work.tokens) * v * (4 + (2 * prec.compute if low else 0))
        loss = gathered + chunk + (v * h * (4 + prec.compute) if low else 0)
    else:
        loss = work.tokens * v * (4 + prec.compute)
    candidates = [
        (backward, _BACKWARD_WHAT + (" + its recompute" if ac else "") + " + its gradients"),
        (loss, "loss: " + ("gathered head + logits chunk" if is_fused(layout, workload) else "full-logits gradient")),
    ]
    return max(candidates)


def memory_bytes(
    info: ModelInfo, layout: ParallelConfig, ac: bool, micro_batch: int, workload: Workload, shards: "Shards",
    in_flight: int = 1,
) -> tuple[dict[str, int], str]:
    """The per-GPU breakdown (it sums to the predicted peak) and what the transient is.

    NOTE: at the optimizer step the activations and accumulated gradients are gone; foreach AdamW's
    sqrt(exp_avg_sq) temporary (half the optimizer state) counts by what it exceeds them.
    """
    prec, state = precision(workload.dtype, workload.method, layout), shards.state
    work = work_of(layout, micro_batch, workload.seq_len)
    micro_batches = workload.global_batch // layout.data_parallel // micro_batch
    accumulation = state.accumulation if micro_batches > 1 else 0
    if layout.pp > 1 and accumulation:  # NOTE: PipelineStage also keeps FSDP2's gathered weights between micro-batches
        accumulation += prec.compute * (shards.sums.dense + shards.sums.experts)
    held = dict(
        accumulation=accumulation,
        activations=activation_bytes(info, work, layout, prec, ac, workload, in_flight),
        all_to_all=all_to_all_bytes(info, work, layout, prec),
    )
    transient, what = max(
        transient_bytes(info, work, layout, prec, ac, workload, shards.sums),
        (state.optimizer // 2 - sum(held.values()), "optimizer step: AdamW's sqrt temporary"),
    )
    breakdown = dict(parameters=state.parameters, gradients=state.gradients, optimizer=state.optimizer)
    return breakdown | held | dict(transient=transient, runtime=RUNTIME_RESERVE), what


def all_to_all_bytes(info: ModelInfo, work: Work, layout: ParallelConfig, prec: Precision) -> int:
    """EP send + receive buffers of one MoE layer's dispatch (balanced routing)."""
    if layout.ep == 1 or not any(info.moe_flags[i] for i in info.layers):
        return 0
    return 2 * work.tokens * info.moe.n_activated_experts * info.moe.dim * prec.compute


# ----- one layout: step time ---------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu: GPUSpec
    efficiency: float


def _ring(size: int) -> float:
    """Fraction of a tensor each rank sends (and receives) in a ring all-gather or reduce-scatter."""
    return (size - 1) / size


def _bandwidth(span: int, hw: Hardware) -> float:
    """Bytes/s for a group whose ranks lie within ``span`` consecutive ranks (8 per node)."""
    return 1e9 * (hw.gpu.bandwidth if span <= hw.gpu.gpus_per_node else hw.gpu.inter_node_bandwidth)


def flops_per_rank(info: ModelInfo, layout: ParallelConfig, ac: bool, workload: Workload) -> float:
    """Training FLOPs one rank runs per step (``accounting.flops_per_token`` split as the layout splits
    the work: tp divides all but the routed experts, which every tp peer runs on the same tokens)."""
    config, moe = info.config, info.moe
    matmul = info.matmul_flops  # 6 x weights one token multiplies by, LM head included
    attention = info.attention_flops * workload.seq_len
    routed = 6 * sum(info.moe_flags) * moe.n_activated_experts * 3 * moe.dim * moe.moe_inter_dim if moe is not None else 0
    head = 6 * config.vocab_size * config.hidden_size
    dense = matmul - routed
    weights = 1.0 if workload.method == "full" else 4 / 6  # NOTE: frozen weights need no weight gradients
    per_token = (dense * weights + attention) / layout.tp + routed * weights
    if ac:  # NOTE: one more forward of every block (not of the LM head)
        per_token += ((dense - head) / 3 + attention / 3) / layout.tp + routed / 3
    tokens = workload.global_batch * workload.seq_len / (layout.data_parallel * layout.cp)
    return tokens * per_token * info.share


class Traffic(NamedTuple):
    """What one rank's collectives carry in a step: ``passes`` through the blocks per micro-batch
    (forward, backward, and the recompute with checkpointing), in ``width``-byte elements."""

    micro_batches: int
    passes: int
    work: Work
    width: int


def fsdp_seconds(layout: ParallelConfig, sums: UnitSums, traffic: Traffic, hw: Hardware) -> float:
    """All-gathers of every unit in forward and backward of each micro-batch (compute dtype), one fp32
    reduce-scatter of the trained ones, and under HSDP the all-reduce of the shards across replicas."""
    dense_n, expert_n = layout.dp_shard * layout.cp, layout.ep_shard
    dense_bw, expert_bw = _bandwidth(dense_n * layout.tp, hw), _bandwidth(hw.gpus, hw)
    gathered = sums.dense * _ring(dense_n) / dense_bw + sums.experts * _ring(expert_n) / expert_bw
    reduced = sums.trained_dense * _ring(dense_n) / dense_bw + sums.trained_experts * _ring(expert_n) / expert_bw
    seconds = 2 * traffic.micro_batches * traffic.width * gathered + 4 * reduced
    if layout.dp_replicate > 1:
        sharded = sums.trained_dense / dense_n + sums.trained_experts / expert_n
        seconds += 2 * _ring(layout.dp_replicate) * 4 * sharded / _bandwidth(hw.gpus, hw)
    return seconds


def ep_seconds(info: ModelInfo, layout: ParallelConfig, traffic: Traffic, hw: Hardware) -> float:
    """Dispatch and combine all-to-alls of every MoE layer, each pass."""
    moe_layers = sum(info.moe_flags[i] for i in info.layers)
    if layout.ep == 1 or not moe_layers:
        return 0.0
    rows = traffic.work.tokens * info.moe.n_activated_experts
    per_layer = 2 * rows * info.moe.dim * traffic.width * _ring(layout.ep)
    return traffic.micro_batches * moe_layers * traffic.passes * per_layer / _bandwidth(layout.ep, hw)


def tp_seconds(info: ModelInfo, layout: ParallelConfig, traffic: Traffic, hw: Hardware) -> float:
    """All-reduces after attention and after each TP-split MLP (input gradients in backward), the
    embedding's and the head's, and the logits all-gathered (and reduce-scattered back)."""
    if layout.tp == 1:
        return 0.0
    config, tokens = info.config, traffic.work.tokens
    split_mlps = sum(not info.moe_flags[i] or info.moe.n_shared_experts > 0 for i in info.layers)
    reduces = traffic.passes * (len(info.layers) + split_mlps) + info.first + info.last
    logits = 2 * tokens * config.vocab_size * traffic.width * _ring(layout.tp) * info.last
    per_micro_batch = reduces * 2 * _ring(layout.tp) * tokens * config.hidden_size * traffic.width + logits
    return traffic.micro_batches * per_micro_batch / _bandwidth(layout.tp, hw)


def cp_seconds(info: ModelInfo, layout: ParallelConfig, traffic: Traffic, hw: Hardware) -> float:
    """K and V of the whole sequence all-gathered by every attention layer (reduce-scattered back)."""
    if layout.cp == 1:
        return 0.0
    kv = 2 * traffic.work.keys * info.config.num_key_value_heads // layout.tp * info.config.head_dim
    per_layer = kv * traffic.width * _ring(layout.cp)
    return traffic.micro_batches * traffic.passes * len(info.layers) * per_layer / _bandwidth(layout.cp * layout.tp, hw)


def pp_seconds(info: ModelInfo, layout: ParallelConfig, traffic: Traffic, hw: Hardware) -> float:
    """Hidden states to the next stage and their gradients back, per micro-batch (pp is the outer
    mesh dim, so stages sit world/pp ranks apart)."""
    if layout.pp == 1:
        return 0.0
    sent = 2 * traffic.work.tokens * info.config.hidden_size * traffic.width
    return traffic.micro_batches * sent / _bandwidth(hw.gpus, hw)


def comm_seconds(
    info: ModelInfo, layout: ParallelConfig, ac: bool, micro_batch: int, workload: Workload, hw: Hardware, sums: UnitSums,
) -> dict[str, float]:
    """Seconds per step of each kind of communication on one rank."""
    traffic = Traffic(
        micro_batches=workload.global_batch // layout.data_parallel // micro_batch,
        passes=3 if ac else 2,
        work=work_of(layout, micro_batch, workload.seq_len),
        width=precision(workload.dtype, workload.method, layout).compute,
    )
    return dict(
        fsdp=fsdp_seconds(layout, sums, traffic, hw),
        ep=ep_seconds(info, layout, traffic, hw),
        tp=tp_seconds(info, layout, traffic, hw),
        cp=cp_seconds(info, layout, traffic, hw),
        pp=pp_seconds(info, layout, traffic, hw),
    )


def step_seconds(
    info: ModelInfo, layout: ParallelConfig, ac: bool, micro_batch: int, workload: Workload, hw: Hardware, sums: UnitSums,
) -> dict[str, float]:
    """compute, each communication, and the step: FSDP2 overlaps compute, EP/TP/CP/PP do not; a
    pipeline idles (pp - 1) of (micro-batches + pp - 1) slots (1F1B's and GPipe's bubble)."""
    compute = flops_per_rank(info, layout, ac, workload) / (hw.gpu.peak_tflops * 1e12 * hw.efficiency)
    comm = comm_seconds(info, layout, ac, micro_batch, workload, hw, sums)
    micro_batches = workload.global_batch // layout.data_parallel // micro_batch
    bubble = (micro_batches + layout.pp - 1) / micro_batches
    exposed = comm["ep"] + comm["tp"] + comm["cp"] + comm["pp"]
    return dict(compute=compute, **comm, step=(max(compute, comm["fsdp"]) + exposed) * bubble)


# ----- enumerate layouts and plan ---------------------------------------------------------------
@dataclass
class PlanRow:
    """One candidate: its layout, whether it fits, the per-GPU memory breakdown (bytes) and speed."""

    layout: dict[str, int]
    activation_checkpointing: bool
    micro_batch: int | None
    micro_batches: int | None  # per optimizer step on each rank (gradient accumulation)
    fits: bool
    why: str | None = None
    memory: dict[str, int] = field(default_factory=dict)
    transient: str | None = None  # what the transient is
    time_s: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    mfu: float | None = None  # flops_per_token x tokens (full fine-tuning's count, also for LoRA) / (step x GPUs x peak)
    loss: str | None = None
    precision: str | None = None

    @property
    def memory_gb(self) -> float | None:
        return sum(self.memory.values()) / GB if self.memory else None

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["memory"] = {k: round(v / GB, 3) for k, v in self.memory.items()}
        row["memory_gb"] = round(self.memory_gb, 3) if self.memory else None
        row["time_s"] = {k: round(v, 4) for k, v in self.time_s.items()}
        for key in ("tokens_per_s", "mfu"):
            row[key] = round(row[key], 4 if key == "mfu" else 1) if row[key] is not None else None
        return row


_SPEC_KEYS = {"dp_replicate", "dp_shard", "cp", "tp", "ep", "pp", "ac", "mb"}
_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def parse_layouts(text: str) -> dict[str, int | bool]:
    """'all' -> {}; 'ep=8,dp_shard=8[,tp=..][,cp=..][,ac=on|off][,mb=N]' -> the fixed values."""
    if text.strip().lower() == "all":
        return {}
    fixed: dict[str, int | bool] = {}
    for part in text.split(","):
        key, _, value = (s.strip() for s in part.partition("="))
        if key not in _SPEC_KEYS:
            raise ValueError(f"--layouts {text!r}: unknown size {key!r}; use 'all' or key=value pairs of {', '.join(sorted(_SPEC_KEYS))}")
        if key == "ac":
            if value.lower() not in _SWITCH:
                raise ValueError(f"--layouts {text!r}: ac={value!r} must be on or off")
            fixed[key] = _SWITCH[value.lower()]
        elif value.isdigit() and int(value) > 0:
            fixed[key] = int(value)
        else:
            raise ValueError(f"--layouts {text!r}: {key}={value!r} must be a positive integer")
    return fixed


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@cache
def pipeline_accepted() -> bool:
    """Whether ``ParallelConfig`` takes pp > 1 (ernie45.distributed implements pipelines)."""
    try:
        ParallelConfig(pp=2)
    except NotImplementedError:
        return False
    return True


def candidate_layouts(config, gpus: int, fixed: dict) -> tuple[list[ParallelConfig], list[str]]:
    """Layouts our code accepts for ``gpus`` ranks (pp only when asked), and why others were refused.

    Size combinations that cannot multiply to ``gpus`` are skipped silently unless the user fixed
    them all; everything else goes through ``ParallelConfig``, ``resolve`` and ``check_model_fits``.
    """
    names = ("dp_replicate", "cp", "tp", "ep", "pp")
    options = {name: [fixed[name]] if name in fixed else _divisors(gpus) for name in names[:3]}
    options["ep"] = [fixed["ep"]] if "ep" in fixed else _divisors(gpus) if getattr(config, "moe_num_experts", 0) else [1]
    options["pp"] = [fixed["pp"]] if "pp" in fixed else _divisors(gpus) if pipeline_accepted() else [1]
    valid, refused = [], {}
    for sizes in itertools.product(*(options[name] for name in names)):
        layout = dict(zip(names, sizes), dp_shard=fixed.get("dp_shard", -1))
        others = layout["dp_replicate"] * layout["cp"] * layout["tp"] * layout["pp"]
        world = others * layout["dp_shard"] == gpus if layout["dp_shard"] != -1 else gpus % others == 0
        folds = (gpus // layout["pp"]) % layout["ep"] == 0  # NOTE: ep folds onto a stage's ranks
        if not (world and folds) and not all(name in fixed for name in ("dp_replicate", "cp", "tp", "pp", "dp_shard", "ep")):
            continue
        try:
            resolved = ParallelConfig(**layout).resolve(gpus)
            check_model_fits(resolved, config)
        except (LayoutError, NotImplementedError) as err:
            refused.setdefault(re.sub(r"\d+", "N", str(err)), str(err))  # NOTE: one example of each kind
            continue
        valid.append(resolved)
    return valid, list(refused.values())


def _sizes(layout: ParallelConfig) -> dict[str, int]:
    return {name: getattr(layout, name) for name in SIZES}


def _largest(memory: dict[str, int]) -> str:
    name = max(memory, key=memory.get)
    return f"{name} {memory[name] / GB:.1f} GB"


@dataclass(frozen=True)
class Shards:
    """What one layout gives each rank to hold (computed once per layout)."""

    state: StateBytes
    sums: UnitSums

    @classmethod
    def of(cls, info: ModelInfo, layout: ParallelConfig, workload: Workload) -> "Shards":
        compute = precision(workload.dtype, workload.method, layout).compute
        return cls(state_bytes(list(info.specs), layout, compute), unit_sums(info, layout))


def in_flight(layout: ParallelConfig, stage: int, micro_batches: int) -> int:
    """Micro-batches a pipeline stage holds between their forward and backward: 1F1B's warm-up
    (pp - stage), GPipe's all of them; 1 without a pipeline."""
    if layout.pp == 1:
        return 1
    return micro_batches if layout.pp_schedule == "GPipe" else min(micro_batches, layout.pp - stage)


def evaluate(
    stages: list[ModelInfo], layout: ParallelConfig, ac: bool, micro_batch: int, workload: Workload, hw: Hardware,
    shards: list[Shards],
) -> PlanRow:
    """Memory and speed of one layout at one micro-batch size: the fullest pipeline rank's memory
    and the slowest one's step (a single "stage" without a pipeline)."""
    micro_batches = workload.global_batch // layout.data_parallel // micro_batch
    memories = [
        memory_bytes(info, layout, ac, micro_batch, workload, shard, in_flight(layout, stage, micro_batches))
        for stage, (info, shard) in enumerate(zip(stages, shards))
    ]
    memory, what = max(memories, key=lambda m: sum(m[0].values()))
    times = max((step_seconds(info, layout, ac, micro_batch, workload, hw, shard.sums) for info, shard in zip(stages, shards)),
                key=lambda t: t["step"])
    tokens = workload.global_batch * workload.seq_len
    info = stages[0]
    model_flops = (info.matmul_flops + info.attention_flops * workload.seq_len) * tokens
    peak = sum(memory.values())
    fits = peak <= hw.gpu.memory
    why = None if fits else f"needs {peak / GB:.1f} GB per GPU > {hw.gpu.memory / GB:.1f} GB (largest: {_largest(memory)})"
    return PlanRow(
        layout=_sizes(layout),
        activation_checkpointing=ac,
        micro_batch=micro_batch,
        micro_batches=micro_batches,
        fits=fits,
        why=why,
        memory=memory,
        transient=what,
        time_s=times,
        tokens_per_s=tokens / times["step"],
        mfu=model_flops / (times["step"] * hw.gpus * hw.gpu.peak_tflops * 1e12),
        loss="fused" if is_fused(layout, workload) else "masked",
        precision=precision(workload.dtype, workload.method, layout).mode,
    )


def rows_for(info: ModelInfo, layout: ParallelConfig, fixed: dict, workload: Workload, hw: Hardware) -> Iterator[PlanRow]:
    """Every activation-checkpointing choice and micro-batch size (under pp: pp_microbatch_size, the
    whole per-rank batch in one schedule step) of one layout."""
    dp, stages, shards = layout.data_parallel, None, None
    for ac in [fixed["ac"]] if "ac" in fixed else [False, True]:
        if workload.global_batch % dp:
            why = f"--global-batch {workload.global_batch} is not a multiple of the {dp} data-parallel ranks (dp_replicate x dp_shard)"
            yield PlanRow(_sizes(layout), ac, None, None, False, why)
            continue
        per_rank = workload.global_batch // dp
        for micro_batch in [fixed["mb"]] if "mb" in fixed else _divisors(per_rank):
            why = None
            if per_rank % micro_batch:
                why = f"micro-batch {micro_batch} does not divide the {per_rank} sequences per data-parallel rank"
            elif layout.pp > 1 and layout.pp_schedule != "GPipe" and per_rank // micro_batch < layout.pp:
                why = f"{layout.pp_schedule} needs at least pp={layout.pp} micro-batches per step; {per_rank // micro_batch} here"
            if why:
                yield PlanRow(_sizes(layout), ac, micro_batch, None, False, why)
                continue
            stages = stages or info.stages(layout)
            shards = shards or [Shards.of(stage, layout, workload) for stage in stages]
            step_layout = dataclasses.replace(layout, pp_microbatch_size=micro_batch) if layout.pp > 1 else layout
            yield evaluate(stages, step_layout, ac, micro_batch, workload, hw, shards)


def _order(row: PlanRow) -> tuple:
    """Fitting rows by speed (the leaner first among equally fast ones), then the others by memory."""
    memory = row.memory_gb if row.memory_gb is not None else math.inf
    return (0, -round(row.tokens_per_s), memory) if row.fits else (1, memory, 0)


def check_inputs(config, gpus: int, workload: Workload, efficiency: float) -> None:
    """Bad values are one ValueError naming the option."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus {gpus!r} must be a positive integer")
    limit = config.max_position_embeddings
    if not 2 <= workload.seq_len <= limit:
        raise ValueError(
            f"--seq-len {workload.seq_len} must be between 2 and the model's max_position_embeddings={limit} (a longer "
            "context needs RoPE scaling: plan with --model DIR whose config.json has rope_parameters and a larger "
            "max_position_embeddings)"
        )
    for name, value, valid in (("--method", workload.method, ("full", "lora")), ("--dtype", workload.dtype, ("bf16", "fp32")),
                               ("--loss", workload.loss, ("fused", "masked"))):
        if value not in valid:
            raise ValueError(f"{name} {value!r} is not valid; use {' or '.join(valid)}")
    if workload.global_batch < 1 or workload.lora_rank < 1:
        raise ValueError("--global-batch and --lora-rank must be >= 1")
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency {efficiency} must be in (0, 1]: the fraction of peak FLOP/s the matmuls reach")


def hardware(gpus: int, gpu: str, gpu_memory, peak_tflops, bandwidth, inter_node_bandwidth, efficiency) -> Hardware:
    """The GPU preset with the user's overrides."""
    spec = gpu_spec(gpu)
    overrides = dict(peak_tflops=peak_tflops, bandwidth=bandwidth, inter_node_bandwidth=inter_node_bandwidth)
    for name, value in overrides.items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive number")
    overrides = {k: float(v) for k, v in overrides.items() if v is not None}
    if gpu_memory is not None:
        overrides["memory"] = gpu_memory if isinstance(gpu_memory, int) else parse_memory(gpu_memory)
    return Hardware(gpus, dataclasses.replace(spec, **overrides), efficiency)


@dataclass
class Plan:
    rows: list[PlanRow]
    notes: list[str]  # layouts not considered, and why
    summary: str  # the model, hardware and workload in one line


def describe(info: ModelInfo, hw: Hardware, workload: Workload) -> str:
    gpu = hw.gpu
    return (
        f"{info.config.model_type}: {info.parameters / 1e9:.2f}B parameters ({info.active / 1e9:.2f}B active) | "
        f"{hw.gpus} x {gpu.name}: "
        f"{gpu.memory / GB:.1f} GB, {gpu.peak_tflops:g} TFLOP/s bf16 x efficiency {hw.efficiency:g}, "
        f"{gpu.bandwidth:g} GB/s in a node, {gpu.inter_node_bandwidth:g} GB/s between nodes | seq {workload.seq_len}, "
        f"global batch {workload.global_batch}, {workload.method}"
        + (f" (rank {workload.lora_rank})" if workload.method == "lora" else "") + f" fine-tuning, {workload.dtype}"
    )


def make_plan(
    model, gpus: int, *, gpu: str = "H100", gpu_memory: int | str | None = None, seq_len: int = 4096,
    global_batch: int = 128, method: str = "full", lora_rank: int = 16, dtype: str = "bf16",
    layouts: str = "all", loss: str = "fused", peak_tflops: float | None = None, bandwidth: float | None = None,
    inter_node_bandwidth: float | None = None, efficiency: float = 0.4,
) -> Plan:
    """``plan``'s rows, with notes and a summary line (what ``ernie45 plan`` prints)."""
    config = resolve_model_config(model)
    workload = Workload(seq_len, global_batch, method, lora_rank, dtype, loss)
    check_inputs(config, gpus, workload, efficiency)
    hw = hardware(gpus, gpu, gpu_memory, peak_tflops, bandwidth, inter_node_bandwidth, efficiency)
    fixed = parse_layouts(layouts)
    candidates, refused = candidate_layouts(config, gpus, fixed)
    if method == "lora" and any(layout.tp > 1 for layout in candidates):
        # NOTE: the recipe refuses peft with tp_size > 1 (LoRA is not tensor-parallel yet)
        candidates = [layout for layout in candidates if layout.tp == 1]
        refused.insert(0, "LoRA with tp > 1 is not supported yet (use dp_shard/ep/cp/pp)")
    if not candidates:
        reason = refused[0] if refused else "its sizes do not multiply into that many GPUs"
        raise ValueError(f"no layout of {gpus} GPU(s) matching --layouts {layouts!r} is valid: {reason}")
    info = ModelInfo.of(config, lora_rank if method == "lora" else None)
    rows = [row for layout in candidates for row in rows_for(info, layout, fixed, workload, hw)]
    notes = [f"not valid here: {reason}" for reason in refused]
    if not pipeline_accepted():
        notes.append("pp (pipeline parallelism): not implemented in ernie45.distributed; layouts with pp > 1 were not considered")
    elif any(layout.pp > 1 for layout in candidates):
        notes.append("pp > 1: the 1F1B schedule, one stage per rank, stages split by ernie45's cost balance; "
                     "mb = pp_microbatch_size, the whole per-rank batch in one schedule step; the fullest and slowest rank shown")
    return Plan(sorted(rows, key=_order), notes, describe(info, hw, workload))


def plan(model, gpus: int, **options) -> list[PlanRow]:
    """Every valid layout of ``model`` (a preset, checkpoint directory, cached hub id or transformers
    config) on ``gpus`` GPUs with its per-GPU memory and predicted speed, fitting ones first by
    tokens/s: the rows ``ernie45 plan`` prints. Options as ``make_plan`` (the CLI's, in Python spelling)."""
    return make_plan(model, gpus, **options).rows


# ----- output ------------------------------------------------------------------------------------
_COLUMNS = ("parameters", "gradients", "optimizer", "accumulation", "activations", "transient", "all_to_all")
_SHORT = ("params", "grads", "optim", "accum", "activ", "trans", "a2a")


def layout_text(sizes: dict[str, int]) -> str:
    """'dp_shard=8 ep=8': dp_shard always, the other sizes when above 1."""
    return " ".join(f"{k}={v}" for k, v in sizes.items() if k == "dp_shard" or v > 1)


def _cells(row: PlanRow) -> list[str]:
    memory = [f"{row.memory[k] / GB:.1f}" for k in _COLUMNS] if row.memory else ["-"] * len(_COLUMNS)
    batches = f"{row.micro_batch}x{row.micro_batches}" if row.micro_batches else (str(row.micro_batch or "-"))
    speed = [f"{row.tokens_per_s:,.0f}", f"{row.time_s['step']:.2f}", f"{row.mfu:.0%}"] if row.tokens_per_s else ["-"] * 3
    fits = "yes" if row.fits else "NO"
    total = f"{row.memory_gb:.1f}" if row.memory else "-"
    return [layout_text(row.layout), "on" if row.activation_checkpointing else "off", batches, total, fits, *memory, *speed]


def format_table(result: Plan, limit: int = 15) -> str:
    """The rows as a fixed-width table (the first ``limit``; 0 = all), then the notes."""
    header = ["layout", "AC", "mb x n", "GB/GPU", "fits", *_SHORT, "tokens/s", "step s", "MFU"]
    shown = result.rows if limit == 0 else result.rows[:limit]
    cells = [header] + [_cells(row) for row in shown]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [result.summary, ""]
    for line, row in zip(cells, [None, *shown]):
        text = "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        lines.append(text + (f"  {row.why}" if row is not None and row.why and row.memory else ""))
        if row is not None and not row.memory:
            lines[-1] += f"  {row.why}"
    fitting = sum(row.fits for row in result.rows)
    lines.append("")
    lines.append(
        f"{fitting} of {len(result.rows)} layouts fit. GB = 10^9 bytes; mb x n = micro-batch x micro-batches per step; "
        "memory is the sum of the columns plus 2 GiB runtime reserve."
    )
    if len(shown) < len(result.rows):
        lines.append(f"{len(result.rows) - len(shown)} more rows: --limit 0 shows them all, --json gives every row.")
    lines.extend(result.notes)
    return "\n".join(lines)


def to_json(result: Plan) -> str:
    return json.dumps([row.to_json() for row in result.rows], indent=1)
