"""Adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What PEFT 0.21 (``PeftModel.from_pretrained`` on transformers' ERNIE 4.5 models) reads, and
what we read back from adapters PEFT made. Keys are ``base_model.model.<module>.lora_{A,B}.weight``.

Linear layer ``M``: ``M.lora_A.weight`` [r,in], ``M.lora_B.weight`` [out,r] (ours, as they are).
Routed experts ``X`` (PEFT's ``target_parameters``, one ``ParamWrapper`` per targeted tensor,
nested in the order the tensors are registered: ``gate_up_proj`` innermost): the outermost wrapper
is ``X``, each one inside it adds ``.base_layer``; with both targeted, ``gate_up_proj`` is
``X.base_layer.lora_*`` and ``down_proj`` is ``X.lora_*``. Each holds all experts' pairs stacked
along the rank axis, and the two factors stack differently:

    lora_A [E*r, in]   row    e*r + j  = A_e[j]      (ours [E,r,in]:  A.reshape(E*r, in))
    lora_B [out, r*E]  column j*E + e  = B_e[:, j]   (ours [E,out,r]: B.permute(1,2,0).reshape(out, r*E))

Scale: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); per-tensor ranks and alphas that
differ from ``r``/``lora_alpha`` go in ``rank_pattern``/``alpha_pattern`` (PEFT matches their
keys as regexes against the module name, or the ``X.<tensor>`` name for expert tensors).
We write every scale as a plain ``alpha / r`` (an rsLoRA adapter gets the equivalent alpha).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.gather import failure_from_rank0, gather_on_rank0, is_parallel
from ..checkpoint.safetensors_io import CheckpointError, json_object
from ..checkpoint.staging import StagedSave
from ..moe.experts import EXPERT_PROJECTIONS, GroupedExperts
from ..sharding import local_index, local_part
from .lora import LoRALinear, adapter_parameters, freeze_base, lora_modules, place, replace_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTORS = (".lora_A.weight", ".lora_B.weight")
_V4_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_BASE_COPY = ".base_layer.weight"
# PEFT features that change what an adapter computes and that we do not implement.
_REFUSED = {
    "use_dora": "DoRA",
    "lora_bias": "trainable LoRA biases",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trainable token embeddings",
    "layers_to_transform": "layer selection by index",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "fan_in_fan_out weights",
    "use_qalora": "QA-LoRA",
}


# ----- our layout <-> PEFT's ------------------------------------------------------------------------
def expert_key_prefix(module: str, projection: str, adapted: list[str]) -> str:
    """PEFT's name for the wrapper of ``projection`` among the ``adapted`` tensors of experts ``module``."""
    depth = len(adapted) - 1 - adapted.index(projection)
    return module + ".base_layer" * depth


def experts_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [E,r,in], b [E,out,r] -> PEFT's lora_A [E*r,in], lora_B [out,r*E]."""
    experts, rank, _ = a.shape
    return a.reshape(experts * rank, -1), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def experts_from_peft(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_A [E*r,in], lora_B [out,r*E] -> a [E,r,in], b [E,out,r]."""
    rank = a.shape[0] // experts
    return a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class AdapterSpec:
    """One adapted tensor: linear layer ``module`` (projection None) or an expert projection."""

    module: str
    projection: str | None
    rank: int
    scale: float
    key: str  # PEFT's key prefix (before ``.lora_A.weight``)
    target: str  # what PEFT's config names: a module (target_modules) or a tensor (target_parameters)

    @property
    def is_parameter_target(self) -> bool:
        return self.target != self.module


def linear_target(model: nn.Module, name: str) -> str:
    """How PEFT's config names linear layer ``name``: itself, or its ``.weight`` tensor where needed.

    NOTE: PEFT 0.21 on transformers 5 rewrites an ERNIE MoE adapter's ``target_modules`` that end in
    ``gate_proj``/``up_proj``/``down_proj`` as if they named transformers 4's per-expert layers: it
    retargets them to the routed experts (doubling the rank) and drops the layers meant. Named as
    ``target_parameters`` (``<module>.weight``, PEFT's 2-D ``ParamWrapper``: same tensors, same keys,
    same math) they load as written.
    """
    if getattr(model, "moe_config", None) is not None and name.rpartition(".")[2] in _V4_EXPERT_NAMES:
        return f"{name}.weight"
    return name


def model_specs(model: nn.Module) -> list[AdapterSpec]:
    """Every adapter of ``model`` with the PEFT key it is saved under."""
    specs = []
    for name, module in lora_modules(model):
        if isinstance(module, LoRALinear):
            rank = module.lora_A.weight.shape[0]
            specs.append(AdapterSpec(name, None, rank, module.scale, name, linear_target(model, name)))
            continue
        adapted = [p for p in EXPERT_PROJECTIONS if p in module.lora_scales]
        for projection in adapted:
            rank = module.get_parameter(f"{projection}_lora_A").shape[1]
            key = expert_key_prefix(name, projection, adapted)
            scale = module.lora_scales[projection]
            specs.append(AdapterSpec(name, projection, rank, scale, key, f"{name}.{projection}"))
    return specs


def _tensors_of(model: nn.Module, spec: AdapterSpec) -> tuple[nn.Parameter, nn.Parameter]:
    module = model.get_submodule(spec.module)
    if spec.projection is None:
        return module.lora_A.weight, module.lora_B.weight
    return module.get_parameter(f"{spec.projection}_lora_A"), module.get_parameter(f"{spec.projection}_lora_B")


# ----- saving --------------------------------------------------------------------------------------
def _alpha(spec: AdapterSpec) -> float:
    alpha = spec.scale * spec.rank
    return float(f"{alpha:.12g}")  # NOTE: 32/8*8 may print as 32.00000000000001 otherwise


def adapter_config(specs: list[AdapterSpec], base_model: str | None = None, dropout: float = 0.0) -> dict:
    """PEFT's ``adapter_config.json`` for ``specs``: the most common (rank, alpha) is ``r``/``lora_alpha``."""
    common = Counter((s.rank, _alpha(s)) for s in specs).most_common(1)[0][0]
    odd = [s for s in specs if (s.rank, _alpha(s)) != common]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": common[0],
        "lora_alpha": common[1],
        "rank_pattern": {re.escape(s.target): s.rank for s in odd},
        "alpha_pattern": {re.escape(s.target): _alpha(s) for s in odd},
        "use_rslora": False,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(s.target for s in specs if not s.is_parameter_target),
        "target_parameters": sorted(s.target for s in specs if s.is_parameter_target),
    }


def _peft_tensors(model: nn.Module, specs: list[AdapterSpec], parallel: bool) -> dict[str, torch.Tensor] | None:
    """PEFT's key -> tensor on the writing rank (None elsewhere); collective for a sharded model."""
    out: dict[str, torch.Tensor] | None = {}
    for spec in specs:
        a, b = (gather_on_rank0(t) if parallel else t.detach() for t in _tensors_of(model, spec))
        if a is None:
            out = None
            continue
        if spec.projection is not None:
            a, b = experts_to_peft(a, b)
        out[PREFIX + spec.key + _FACTORS[0]] = a.cpu().contiguous()
        out[PREFIX + spec.key + _FACTORS[1]] = b.cpu().contiguous()
    return out


def _save_dropout(model: nn.Module, specs: list[AdapterSpec]) -> float:
    """The dropout to record. PEFT's acts on the input ("pre") and is refused with target_parameters;
    an adapter with those (expert tensors, MoE models' MLPs) or "post" dropout records 0.

    NOTE: dropout acts only in training; what the adapter computes (PEFT's load, merges) is the same."""
    if any(spec.is_parameter_target for spec in specs):
        return 0.0
    kinds = {(m.dropout, m.dropout_position) for _, m in lora_modules(model)}
    rate, position = kinds.pop() if len(kinds) == 1 else (0.0, "pre")
    return rate if position == "pre" else 0.0


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> None:
    """Write ``model``'s adapters into ``directory`` as PEFT does (replacing only those two files).

    Collective for a sharded model: every rank calls it, rank 0 writes and its error is raised on all.
    """
    specs = model_specs(model)
    if not specs:
        raise ValueError("this model holds no LoRA adapters to save (add them with ernie45.peft.apply_lora)")
    parallel = is_parallel(adapter_parameters(model))
    tensors = _peft_tensors(model, specs, parallel)
    failure = None
    if tensors is not None and _is_writer():
        try:
            config = adapter_config(specs, base_model, _save_dropout(model, specs))
            with StagedSave(directory) as staged:
                with staged.file(ADAPTER_WEIGHTS) as path:
                    save_file(tensors, str(path), metadata={"format": "pt"})
                with staged.file(ADAPTER_CONFIG) as path:
                    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        except Exception as err:  # NOTE: raised on every rank below, not only on rank 0
            failure = err
    if parallel:
        failure = failure_from_rank0(failure)
    if failure is not None:
        raise failure


# ----- reading -------------------------------------------------------------------------------------
@dataclass
class Adapter:
    """An adapter read from a directory: what to add where, and the values (our layout)."""

    directory: Path
    specs: list[AdapterSpec]
    values: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    dropout: float = 0.0
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # base weight name -> value


def _read_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}: pass the directory PEFT's save_pretrained wrote")
    config = json_object(path.read_bytes(), path)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type={config['peft_type']!r}; only LoRA adapters (LORA) are supported")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {key}={config[key]!r} ({what}) is not supported; only plain LoRA is")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={config['bias']!r} is not supported; only bias='none' is")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = " (adapter_model.bin is not supported: save with safe_serialization)" if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    return {key.removeprefix(PREFIX): value for key, value in tensors.items()}


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank/alpha pattern lookup: the first pattern that matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _targeted_projections(config: dict, module: str) -> list[str]:
    targets = config.get("target_parameters") or []
    chosen = []
    for projection in EXPERT_PROJECTIONS:
        key = f"{module}.{projection}"
        if any(key == t or key.endswith(f".{t}") for t in targets):
            chosen.append(projection)
    return chosen


def _spec_of(model: nn.Module, config: dict, prefix: str, a: torch.Tensor, where: Path) -> AdapterSpec:
    """Which of our tensors PEFT's ``prefix`` adapts, at what rank and scale (``a``: its lora_A)."""
    module_name = prefix.replace(".base_layer", "")
    depth = prefix.count(".base_layer")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"{where}: {prefix} adapts {module_name}, which this model does not have") from None
    projection, rank = None, a.shape[0]
    if isinstance(module, GroupedExperts):
        adapted = _targeted_projections(config, module_name)
        if depth >= len(adapted):
            raise CheckpointError(
                f"{where}: {prefix} does not match target_parameters={config.get('target_parameters')} "
                f"(expected {module_name}.gate_up_proj and/or .down_proj)"
            )
        projection = adapted[len(adapted) - 1 - depth]
        rank = a.shape[0] // module.gate_up_proj.shape[0]  # NOTE: PEFT stacks E experts' rank-r pairs
    elif not isinstance(module, nn.Linear) or depth:
        raise CheckpointError(
            f"{where}: {prefix} adapts {module_name} ({type(module).__name__}); only linear layers and the routed "
            "experts' gate_up_proj/down_proj can be adapted (never the router or embeddings)"
        )
    elif getattr(model, "get_input_embeddings", None) and module.weight is model.get_input_embeddings().weight:
        raise CheckpointError(f"{where}: {prefix} adapts the LM head, which this model ties to the embedding")
    target = _peft_target(config, module_name, projection)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, target, config.get("lora_alpha", 8))
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return AdapterSpec(module_name, projection, rank, scale, prefix, target)


def _peft_target(config: dict, module: str, projection: str | None) -> str:
    """The name PEFT matched its rank/alpha patterns against: the tensor's for target_parameters."""
    if projection is not None:
        return f"{module}.{projection}"
    weight = f"{module}.weight"
    targets = config.get("target_parameters") or []
    return weight if any(weight == t or weight.endswith(f".{t}") for t in targets) else module


def read_adapter(model: nn.Module, directory: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter against ``model`` (which may be on the meta device)."""
    directory = Path(directory)
    config, tensors = _read_config(directory), _read_tensors(directory)
    where = directory / ADAPTER_WEIGHTS
    prefixes: dict[str, set[str]] = {}
    base_copies = {}
    for key in tensors:
        factor = next((f for f in _FACTORS if key.endswith(f)), None)
        if key.endswith(_BASE_COPY):  # NOTE: PEFT saves the LM head's base weight when it adapts it
            base_copies[key.removesuffix(_BASE_COPY) + ".weight"] = tensors[key]
        elif factor is None:
            raise CheckpointError(f"{where}: tensor {key} is not a LoRA factor (lora_A/lora_B.weight); not supported")
        else:
            prefixes.setdefault(key[: -len(factor)], set()).add(factor)
    specs, values = [], {}
    for prefix, found in sorted(prefixes.items()):
        if len(found) != 2:
            raise CheckpointError(f"{where}: {prefix} has {sorted(found)[0].lstrip('.')} but not its pair")
        a, b = tensors[prefix + _FACTORS[0]], tensors[prefix + _FACTORS[1]]
        spec = _spec_of(model, config, prefix, a, where)
        if spec.projection is not None:
            a, b = _expert_values(a, b, model.get_submodule(spec.module).gate_up_proj.shape[0], prefix, where)
        _check_shapes(model, spec, a, b, where)
        specs.append(spec)
        values[(spec.module, spec.projection)] = (a, b)
    if not specs:
        raise CheckpointError(f"{where} holds no LoRA tensors")
    return Adapter(directory, specs, values, float(config.get("lora_dropout") or 0.0), base_copies)


def _expert_values(a, b, experts: int, prefix: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or b.shape[1] != a.shape[0]:
        raise CheckpointError(
            f"{where}: {prefix} lora_A {list(a.shape)} / lora_B {list(b.shape)} are not {experts} experts' "
            "pairs stacked along the rank ([E*r, in] and [out, E*r])"
        )
    return experts_from_peft(a, b, experts)


def _check_shapes(model: nn.Module, spec: AdapterSpec, a: torch.Tensor, b: torch.Tensor, where: Path) -> None:
    module = model.get_submodule(spec.module)
    weight = module.weight if spec.projection is None else module.get_parameter(spec.projection)
    out_dim, in_dim = weight.shape[-2:]
    lead = tuple(weight.shape[:-2])
    want_a, want_b = (*lead, spec.rank, in_dim), (*lead, out_dim, spec.rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise CheckpointError(
            f"{where}: {spec.key} lora_A/lora_B have shapes {list(a.shape)}/{list(b.shape)}; this model's "
            f"{spec.module}{'.' + spec.projection if spec.projection else ''} needs {list(want_a)}/{list(want_b)}"
        )


# ----- applying ------------------------------------------------------------------------------------
def add_adapter_modules(model: nn.Module, adapter: Adapter) -> None:
    """Create the adapter tensors ``adapter`` names (uninitialised; meta if the model is) and freeze the base."""
    for spec in adapter.specs:
        module = model.get_submodule(spec.module)
        if spec.projection is None:
            lora = LoRALinear(module, spec.rank, spec.scale, adapter.dropout, "pre", adapter_dtype(adapter, spec))
            replace_module(model, spec.module, lora)
        else:
            module.add_lora(spec.projection, spec.rank, spec.scale, adapter_dtype(adapter, spec))
    freeze_base(model)


def adapter_dtype(adapter: Adapter, spec: AdapterSpec) -> torch.dtype:
    return adapter.values[(spec.module, spec.projection)][0].dtype


@torch.no_grad()
def fill_adapter(model: nn.Module, adapter: Adapter, device: torch.device | str | None = None) -> None:
    """Copy ``adapter``'s values in: each rank its own box; a meta tensor is replaced on ``device``."""
    for spec in adapter.specs:
        values = adapter.values[(spec.module, spec.projection)]
        for factor, param, value in zip(("lora_A", "lora_B"), _tensors_of(model, spec), values):
            place(model, _param_name(spec, factor), param, value, device)
    for name, value in adapter.base_copies.items():
        _check_base_copy(model, name, value, adapter.directory / ADAPTER_WEIGHTS)


def _check_base_copy(model: nn.Module, name: str, value: torch.Tensor, where: Path) -> None:
    """A base weight PEFT stored beside the adapter must be the one this model loaded."""
    try:
        weight = model.get_parameter(name)
    except AttributeError:
        raise CheckpointError(f"{where}: holds a copy of {name}, which this model does not have") from None
    index = local_index(weight)
    mine, expected = local_part(weight).detach().cpu(), value if index is None else value[index]
    if mine.shape != expected.shape or not torch.equal(mine, expected.to(mine.dtype)):
        raise CheckpointError(
            f"{where}: holds a copy of {name} that differs from the base model's (a resized vocabulary or a "
            "trained layer); load the base model the adapter was trained on"
        )


def _param_name(spec: AdapterSpec, factor: str) -> str:
    return f"{spec.module}.{factor}.weight" if spec.projection is None else f"{spec.module}.{spec.projection}_{factor}"


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Add the LoRA adapter PEFT (or ``save_adapter``) wrote in ``directory`` to ``model``; returns
    the adapted module names. The base weights are frozen; the adapter is trainable."""
    adapter = read_adapter(model, directory)
    add_adapter_modules(model, adapter)
    fill_adapter(model, adapter)
    return sorted({spec.module for spec in adapter.specs})
