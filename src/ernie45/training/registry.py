"""What a recipe's ``_target_`` may name: one allowlist, each name bound to the callable it builds.

A canonical name is the import path of the very object it names (``ernie45.training.data.HellaSwag``
is that class), so a recipe reads like NeMo AutoModel's and every name can be checked by importing
it. AutoModel's own names (``nemo_automodel...``, ``torchdata...``) are aliases of the same objects:
its recipe files run unchanged. Nothing outside this table can be named: a config never imports
code. The recipe builds a component by calling ``resolve(kind, name)`` with the section's keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from ..auto import from_config, from_pretrained
from ..models.backend import BackendConfig
from ..peft.config import PeftConfig
from ..tokenizer import train_tokenizer
from .data import DataLoader, HellaSwag, SFTDataset, collate
from .loss import FusedLinearCrossEntropy, MaskedCrossEntropy
from .preference import PreferenceDataset, SyntheticPreference
from .rng import StatefulRNG
from .synthetic import SyntheticMultipleChoice


@dataclass(frozen=True)
class Component:
    """One allowed ``_target_``: its canonical name (= import path), the object, AutoModel's names for it."""

    name: str
    target: Callable
    aliases: tuple[str, ...] = ()


_NEMO = "nemo_automodel.components"
_AUTO_MODEL = "nemo_automodel.NeMoAutoModelForCausalLM"
# kind (the recipe section) -> the components it may name; the first is the default of a section
# that leaves ``_target_`` out.
COMPONENTS: dict[str, tuple[Component, ...]] = {
    "model": (
        Component("ernie45.from_pretrained", from_pretrained, (f"{_AUTO_MODEL}.from_pretrained",)),
        Component("ernie45.from_config", from_config, (f"{_AUTO_MODEL}.from_config",)),
    ),
    "backend": (Component("ernie45.BackendConfig", BackendConfig, (f"{_NEMO}.models.common.BackendConfig",)),),
    "tokenizer": (
        Component("transformers.AutoTokenizer.from_pretrained", AutoTokenizer.from_pretrained),
        Component("ernie45.tokenizer.train_tokenizer", train_tokenizer),
    ),
    "dataset": (
        Component("ernie45.training.data.HellaSwag", HellaSwag, (f"{_NEMO}.datasets.llm.hellaswag.HellaSwag",)),
        Component("ernie45.training.data.SFTDataset", SFTDataset),
        Component("ernie45.training.synthetic.SyntheticMultipleChoice", SyntheticMultipleChoice),
        Component("ernie45.training.preference.PreferenceDataset", PreferenceDataset),
        Component("ernie45.training.preference.SyntheticPreference", SyntheticPreference),
    ),
    "dataloader": (
        Component("ernie45.training.data.DataLoader", DataLoader, ("torchdata.stateful_dataloader.StatefulDataLoader",)),
    ),
    "collate_fn": (Component("ernie45.training.data.collate", collate, (f"{_NEMO}.datasets.utils.default_collater",)),),
    "optimizer": (
        Component("torch.optim.AdamW", torch.optim.AdamW),
        Component("torch.optim.Adam", torch.optim.Adam),
    ),
    "loss_fn": (
        Component("ernie45.training.loss.MaskedCrossEntropy", MaskedCrossEntropy, (f"{_NEMO}.loss.masked_ce.MaskedCrossEntropy",)),
        Component(
            "ernie45.training.loss.FusedLinearCrossEntropy",
            FusedLinearCrossEntropy,
            (f"{_NEMO}.loss.linear_ce.FusedLinearCrossEntropy",),
        ),
    ),
    "rng": (Component("ernie45.training.rng.StatefulRNG", StatefulRNG, (f"{_NEMO}.training.rng.StatefulRNG",)),),
    "peft": (Component("ernie45.peft.PeftConfig", PeftConfig, (f"{_NEMO}._peft.lora.PeftConfig",)),),
}


def allowed_names(kind: str) -> list[str]:
    """The canonical names a ``kind`` section may give as ``_target_``."""
    return sorted(component.name for component in COMPONENTS[kind])


def default_name(kind: str) -> str:
    return COMPONENTS[kind][0].name


def lookup(kind: str, name: object) -> Component:
    """The component ``name`` (canonical or an AutoModel alias) stands for; anything else is a clear error."""
    for component in COMPONENTS[kind]:
        if name == component.name or name in component.aliases:
            return component
    raise ValueError(
        f"_target_={name!r} is not an allowed {kind} component (configs never import arbitrary code); "
        f"choose one of {allowed_names(kind)}"
    )


def canonical_name(kind: str, name: object) -> str:
    return lookup(kind, name).name


def resolve(kind: str, name: object) -> Callable:
    """The callable a recipe builds the component with."""
    return lookup(kind, name).target


def check_arguments(kind: str, name: str, given: set[str], supplied: tuple[str, ...] = ()) -> None:
    """A section's keys must be parameters of its component, and its required parameters present.

    ``supplied``: parameters the recipe passes itself (the parameters to optimize, the examples).
    The message names the components a stray key belongs to, so a key left over from another
    ``_target_`` is easy to place.
    """
    target = resolve(kind, name)
    parameters = _parameters(target)
    for key in sorted(given - set(parameters) if not _takes_any_keyword(target) else ()):
        owners = [c.name for c in COMPONENTS[kind] if key in _parameters(c.target)]
        raise ValueError(f"{key} is only for {owners}" if owners else f"{name} does not take {key}")
    required = [key for key, p in parameters.items() if p.default is p.empty and key not in given and key not in supplied]
    if required:
        raise ValueError(f"{name} needs {', '.join(required)}")


def _takes_any_keyword(target: Callable) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


def _parameters(target: Callable) -> dict[str, inspect.Parameter]:
    """Keyword-capable parameters of a callable (a class: of its constructor)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {key: p for key, p in inspect.signature(target).parameters.items() if p.kind in kinds}
