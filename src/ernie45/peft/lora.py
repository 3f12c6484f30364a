"""LoRA on a built model: linear layers and the routed experts' grouped tensors.

Shapes: a linear layer W [out,in] gets A [r,in] and B [out,r]:
``y = x W^T + b + scale * B(A(x))`` (dropout on x "pre" or on the update "post"). The routed
experts get per-expert pairs held as grouped tensors (``GroupedExperts.add_lora``), applied inside
both expert kernels. B starts at zero, so an adapted model starts equal to its base.

Never adapted: the router (``mlp.gate``, not a linear layer here), the correction bias (a buffer),
norms, embeddings and a LM head tied to the embedding (one matrix serves both ends: its update
could not be written back as a tied checkpoint). Every base parameter is frozen; only adapter
tensors require gradients, so an optimizer built from them holds no base state.

Works on a meta-device model (before it is laid out over ranks and allocated): ``apply_lora``
only creates tensors beside the base weights; ``init_lora`` draws the values afterwards, the same
full values on every rank, each rank keeping its own box of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.hf_checkpoint import is_adapter_tensor, set_tensor
from ..models.linear import Linear
from ..moe.experts import EXPERT_PROJECTIONS, GroupedExperts
from ..sharding import is_dtensor, local_index, local_part
from .config import PeftConfig

logger = logging.getLogger(__name__)


class LoRAFactor(nn.Module):
    """One factor of an adapter, held as ``.weight`` so names read ``lora_A.weight`` as PEFT's do.

    NOTE: not an ``nn.Linear``: code that walks linear layers (init, TP plans, a second
    ``apply_lora``) must not take a factor for a layer."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))


class LoRALinear(Linear):
    """A linear layer with a low-rank update; ``weight``/``bias`` stay the base layer's tensors
    (same names, same objects), so base checkpoints load and save unchanged. The base product is
    ``Linear``'s (prepacked in CPU bf16 inference when the base layer was)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        dropout_position: str = "post",
        dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)  # NOTE: not nn.Linear's: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.prepack, self._packed, self._blocks = getattr(base, "prepack", False), None, 0
        like = dict(dtype=dtype or base.weight.dtype, device=base.weight.device)
        self.lora_A = LoRAFactor(rank, base.in_features, **like)
        self.lora_B = LoRAFactor(base.out_features, rank, **like)
        self.scale = scale
        self.dropout = dropout
        self.dropout_position = dropout_position
        self.lora_enabled = True  # False inside ``adapters_disabled``: the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.lora_enabled:
            return out
        drop = self.dropout if self.training else 0.0
        low = F.linear(F.dropout(x, drop) if self.dropout_position == "pre" else x, self.lora_A.weight.to(x.dtype))
        update = F.linear(low * self.scale, self.lora_B.weight.to(x.dtype))
        return out + (F.dropout(update, drop) if self.dropout_position == "post" else update)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_A.weight.shape[0]}, scale={self.scale:g}"


# ----- choosing the targets ------------------------------------------------------------------------
def wildcard_match(pattern: str, name: str) -> bool:
    """AutoModel's glob: ``*`` matches any characters (dots included), the rest literally, whole name."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), name) is not None


def _named(name: str, patterns: list[str]) -> bool:
    return any(name == pattern or wildcard_match(pattern, name) for pattern in patterns)


def _is_tied_head(model: nn.Module, module: nn.Module) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings is not None and module.weight is embeddings.weight


def targets(model: nn.Module, config: PeftConfig) -> tuple[list[str], list[str]]:
    """(linear layer names, routed-experts module names) that ``config`` adapts in ``model``."""
    linears, experts = [], []
    for name, module in model.named_modules():
        if is_adapted(module):
            raise ValueError(f"{name} already holds a LoRA adapter; apply_lora runs once per model")
        if isinstance(module, GroupedExperts) and config.target_modules and _named(name, config.target_modules):
            experts.append(name)
        elif isinstance(module, nn.Linear) and _linear_chosen(name, config):
            if _is_tied_head(model, module):
                logger.info("peft: %s is tied to the embedding and is not adapted", name)
                continue
            linears.append(name)
    if not linears and not experts:
        raise ValueError(f"peft: {_describe(config)} matched no linear layer or routed experts of this model; "
                         f"module names look like {_examples(model)}")
    return linears, experts


def _linear_chosen(name: str, config: PeftConfig) -> bool:
    if config.match_all_linear:
        return True
    if config.target_modules:
        return _named(name, config.target_modules)
    return not _named(name, config.exclude_modules)


def _describe(config: PeftConfig) -> str:
    if config.match_all_linear:
        return "match_all_linear"
    if config.target_modules:
        return f"target_modules={config.target_modules}"
    return f"exclude_modules={config.exclude_modules}"


def _examples(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, GroupedExperts))]
    return ", ".join(names[:4] + names[-2:])


# ----- adding, initialising, counting --------------------------------------------------------------
def apply_lora(model: nn.Module, config: PeftConfig) -> list[str]:
    """Add adapters to ``model`` in place as ``config`` says and freeze everything else.

    Returns the adapted module names. The adapter tensors are uninitialised: call ``init_lora``
    once they are allocated (``from_pretrained(..., peft=...)`` does both). Nothing is changed
    when the config cannot be applied.
    """
    linears, experts = targets(model, config)
    expert_ranks = {name: _expert_rank(model, name, config) for name in experts}
    for name in linears:
        base = model.get_submodule(name)
        lora = LoRALinear(base, config.dim, config.scale(config.dim), config.dropout, config.dropout_position, config.lora_dtype)
        replace_module(model, name, lora)
    for name, rank in expert_ranks.items():
        for projection in EXPERT_PROJECTIONS:
            model.get_submodule(name).add_lora(projection, rank, config.scale(rank), config.lora_dtype)
    if experts and config.dropout:
        logger.info("peft.dropout=%g applies to the linear layers only, not to the routed experts", config.dropout)
    freeze_base(model)
    return linears + experts


def _expert_rank(model: nn.Module, name: str, config: PeftConfig) -> int:
    top_k = model.get_submodule(name.rpartition(".")[0]).top_k  # NOTE: the MoE layer holding the experts
    rank = config.expert_rank(top_k)
    if config.moe_rank_scaling and config.dim % top_k:
        logger.warning("peft.moe_rank_scaling: dim=%d is not a multiple of moe_k=%d; experts get rank %d",
                       config.dim, top_k, rank)
    return rank


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_base(model: nn.Module) -> None:
    """Only adapter tensors require gradients (the router and every base weight are frozen)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_tensor(name))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter tensors by name (what the optimizer trains and ``save_adapter`` writes)."""
    return {name: param for name, param in model.named_parameters() if is_adapter_tensor(name)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside this block ``model`` computes as its base model (PEFT's ``disable_adapter()``): the
    preference recipe's reference model without a second copy of the weights."""
    adapted = [module for _, module in lora_modules(model)]
    for module in adapted:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in adapted:
            module.lora_enabled = True


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_parameters(model))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts over global shapes (a tied matrix counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _initial_value(name: str, shape: torch.Size, method: str, generator: torch.Generator) -> torch.Tensor:
    """B: zeros. A [.., r, in]: each [r,in] drawn as a linear layer's (xavier normal or kaiming uniform)."""
    if name.endswith(("lora_B.weight", "_lora_B")):
        return torch.zeros(shape)
    rank, fan_in = shape[-2], shape[-1]
    if method == "xavier":
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / (fan_in + rank))
    bound = 1.0 / math.sqrt(fan_in)  # NOTE: kaiming_uniform_(a=sqrt(5)), nn.Linear's default
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@torch.no_grad()
def place(model: nn.Module, name: str, param: torch.Tensor, value: torch.Tensor, device=None) -> None:
    """Put the full ``value`` into parameter ``name``: this rank's box of it, or, for a meta
    parameter, a fresh tensor on ``device`` (keeping ``requires_grad``)."""
    if param.is_meta:
        set_tensor(model, name, value.to(device=device or "cpu", dtype=param.dtype).contiguous())
        return
    index = local_index(param)
    local_part(param).copy_(value if index is None else value[index])


@torch.no_grad()
def init_lora(model: nn.Module, method: str = "xavier", seed: int = 0, device=None) -> None:
    """Draw every adapter's starting values: the same full tensors in any layout (in name order from
    one seeded generator), each rank copying in its own box, so 1 and N processes start equal.
    Adapters still on the meta device are created on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(adapter_parameters(model).items()):
        place(model, name, param, _initial_value(name, param.shape, method, generator), device)


# ----- merging -------------------------------------------------------------------------------------
def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor): adapters are small."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor.detach()


@torch.no_grad()
def fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``weight += scale * B @ A`` in place, on this rank's box of ``weight`` (fp32 arithmetic).

    weight [out,in] with a [r,in], b [out,r]; or grouped [E,out,in] with [E,r,in], [E,out,r].
    """
    a, b = _full(a).float(), _full(b).float()
    index = local_index(weight)
    if index is not None:
        b = b[index[:-1]]  # this box's experts and output rows
        a = a[(*index[:-2], slice(None), index[-1])]  # its experts and input columns
    target = local_part(weight)
    target.add_((scale * torch.matmul(b, a)).to(target.dtype))


def _plain_linear(lora: LoRALinear) -> Linear:
    linear = Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
    linear.weight, linear.bias, linear.prepack = lora.weight, lora.bias, lora.prepack
    return linear.train(lora.training)


def is_adapted(module: nn.Module) -> bool:
    """An adapted linear layer, or routed experts holding an adapter."""
    return isinstance(module, LoRALinear) or (isinstance(module, GroupedExperts) and bool(module.lora_scales))


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every adapted linear layer and routed-experts module, in model order."""
    for name, module in model.named_modules():
        if is_adapted(module):
            yield name, module


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove it: ``model`` (returned) is a plain model
    again that computes what the adapted one did. Collective when the model is sharded."""
    for name, module in list(lora_modules(model)):
        if isinstance(module, LoRALinear):
            fold(module.weight, module.lora_A.weight, module.lora_B.weight, module.scale)
            replace_module(model, name, _plain_linear(module))
            continue
        for projection, scale in list(module.lora_scales.items()):
            a = module.get_parameter(f"{projection}_lora_A")
            b = module.get_parameter(f"{projection}_lora_B")
            fold(module.get_parameter(projection), a, b, scale)
            module.remove_lora(projection)
    return model
