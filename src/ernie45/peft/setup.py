"""Adapters added while a model is built (``ernie45.from_pretrained(..., peft=... | adapter=...)``).

The build routine (``models/construction.py``) builds on the meta device, lays the model out over
the ranks, allocates, then loads the base weights. Adapters must exist before the layout (so
FSDP2 and expert parallelism shard them with their layers) and get their values after it; the
routine calls ``add`` and ``fill`` at those two points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import Adapter, add_adapter_modules, fill_adapter, read_adapter
from .config import PeftConfig
from .lora import apply_lora, init_lora


@dataclass
class AdapterSetup:
    """Fresh adapters (``config``, drawn from ``seed``) or ones read from ``directory``: exactly one."""

    config: PeftConfig | None = None
    directory: str | Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.config is None) == (self.directory is None):
            raise ValueError("give either peft=PeftConfig(...) (new adapters) or adapter=DIR (saved ones), not both")
        self._adapter: Adapter | None = None

    def add(self, model: nn.Module) -> None:
        """Create the adapter tensors beside their base weights (on the meta device if the model is)."""
        if self.config is not None:
            apply_lora(model, self.config)
            return
        self._adapter = read_adapter(model, self.directory)
        add_adapter_modules(model, self._adapter)

    def fill(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """Give them their values (each rank its own box); meta ones are created on ``device``."""
        if self.config is not None:
            init_lora(model, self.config.lora_A_init, self.seed, device)
        else:
            fill_adapter(model, self._adapter, device)


def adapter_setup(peft: PeftConfig | dict | None, adapter: str | Path | None, seed: int = 0) -> AdapterSetup | None:
    """The setup ``from_pretrained``/``from_config`` pass to the build routine (None: no adapters)."""
    if peft is None and adapter is None:
        return None
    if isinstance(peft, dict):
        peft = PeftConfig(**peft)
    return AdapterSetup(peft, adapter, seed)
