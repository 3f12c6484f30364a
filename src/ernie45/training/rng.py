"""The run's random generators: seeded once at the start, saved and restored with each checkpoint.

``StatefulRNG(seed, ranked)`` has AutoModel's name and keys (the recipe's ``rng`` section). It
seeds Python's ``random`` and torch (CPU and every CUDA device); with ``ranked`` each rank adds its
rank to the seed, so random draws differ between ranks. ``state_dict`` / ``load_state_dict``
capture and restore those generators, so a resumed run draws what it would have drawn unbroken.
"""

from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    """This process's Python and torch (CPU, and CUDA when present) generator states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back generator states from ``rng_state``."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StatefulRNG:
    """Seeds this process's generators on construction (``seed``, plus ``rank`` when ``ranked``)."""

    def __init__(self, seed: int, ranked: bool = False, rank: int = 0):
        self.seed = seed + (rank if ranked else 0)
        random.seed(self.seed)
        torch.manual_seed(self.seed)  # NOTE: seeds every CUDA device too

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)
