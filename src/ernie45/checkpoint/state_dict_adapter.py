"""NeMo AutoModel's state-dict adapter API (``to_hf``, ``from_hf``, ``convert_single_tensor_to_hf``)
over our HF <-> native mapping (``hf_adapter``), for code written against AutoModel's classes.

Our parameter names are the HF names; only routed experts differ (grouped [E,2I,H] / [E,H,I]
natively, one triple per expert in HF files). The correction bias keeps its HF name and [1,E] shape.
In-memory conversion of whole state dicts; to load a checkpoint use ``from_pretrained`` instead,
which streams tensors and reads only a rank's shards.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from .hf_adapter import hf_expert_keys, is_skipped, to_hf

# model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
_HF_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def _excluded(key: str, exclude_key_regex: str | None) -> bool:
    return bool(exclude_key_regex) and re.match(exclude_key_regex, key) is not None


class Ernie4_5StateDictAdapter:
    """Dense ERNIE 4.5: native names are the HF names (a passthrough, as in AutoModel)."""

    def __init__(self, config: Any):
        self.config = config

    def convert_single_tensor_to_hf(self, fqn: str, tensor: Any, **kwargs) -> list[tuple[str, Any]]:
        """The HF tensors one native tensor stands for (experts split per expert; views)."""
        exclude = kwargs.get("exclude_key_regex")
        return [(key, value) for key, value in to_hf(fqn, tensor) if not _excluded(key, exclude)]

    def to_hf(self, state_dict: dict[str, Any], exclude_key_regex: str | None = None, **kwargs) -> dict[str, Any]:
        return {
            key: value
            for fqn, tensor in state_dict.items()
            for key, value in self.convert_single_tensor_to_hf(fqn, tensor, exclude_key_regex=exclude_key_regex)
        }

    def from_hf(self, hf_state_dict: dict[str, Any], device_mesh=None, **kwargs) -> dict[str, Any]:
        """Native state dict from HF tensors: experts grouped, multi-token-prediction tensors dropped."""
        if device_mesh is not None:
            raise NotImplementedError(
                "from_hf with a device_mesh: load sharded checkpoints with "
                "ernie45.from_pretrained(path, parallel=ParallelConfig(...)), which reads each rank's shard"
            )
        native: dict[str, Any] = {}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
        for key, value in hf_state_dict.items():
            if is_skipped(key):
                continue
            match = _HF_EXPERT.match(key)
            if match:
                experts[match["prefix"]].setdefault(int(match["expert"]), {})[match["part"]] = value
            else:
                native[key] = value
        for prefix, by_expert in experts.items():
            native.update(_grouped(prefix, by_expert))
        return native


def _grouped(prefix: str, by_expert: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``prefix.gate_up_proj`` [E,2I,H] and ``prefix.down_proj`` [E,H,I] from per-expert HF tensors."""
    count = len(by_expert)
    if sorted(by_expert) != list(range(count)):
        raise KeyError(f"{prefix}: experts {sorted(by_expert)} are not numbered 0..{count - 1}")
    grouped = {}
    for kind in ("gate_up_proj", "down_proj"):
        native_key, rows = f"{prefix}.{kind}", []
        for expert in range(count):
            parts = [key.rsplit(".", 2)[-2] for key in hf_expert_keys(prefix, kind, expert)]
            missing = [part for part in parts if part not in by_expert[expert]]
            if missing:
                raise KeyError(f"{prefix}.{expert}: missing {', '.join(missing)} for {native_key}")
            rows.append(torch.cat([by_expert[expert][part] for part in parts]))
        grouped[native_key] = torch.stack(rows)
    return grouped


class Ernie4_5_MoeStateDictAdapter(Ernie4_5StateDictAdapter):
    """MoE ERNIE 4.5: routed experts grouped natively, split per expert in HF (AutoModel's signature)."""

    def __init__(self, config: Any, moe_config=None, backend=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(config)
        self.moe_config = moe_config
        self.backend = backend
        self.dtype = dtype
