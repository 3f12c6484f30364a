"""The KV cache generation writes into: one per layer, filled in place as tokens arrive."""

from __future__ import annotations

import torch


class KVCache:
    """One layer's keys and values, [B,nKV,capacity,hd] each, written in place as tokens arrive.

    NOTE: the buffers are allocated on the first ``update`` from the keys' own shape, dtype and
    device, so the cache fits whatever the attention layer produces (tensor-parallel shards, bf16).
    """

    def __init__(self, capacity: int | None = None):
        """``capacity``: positions to allocate once (generation knows prompt + new tokens); None grows
        the buffers as needed (transformers' ``use_cache=True`` without a known length)."""
        self.capacity = capacity
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [B,nKV,S_new,hd]; return every key/value so far, [B,nKV,length,hd] (views)."""
        end = self.length + k.shape[2]
        if self.capacity is not None and end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, capacity is {self.capacity}")
        if self.keys is None or end > self.keys.shape[2]:
            self._allocate(k, v, end if self.capacity is None else self.capacity)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        """Buffers for at least ``needed`` positions (doubling when growing), keeping what is cached."""
        batch, heads, _, head_dim = k.shape
        size = needed if self.keys is None else max(needed, 2 * self.keys.shape[2])
        keys, values = k.new_empty(batch, heads, size, head_dim), v.new_empty(batch, heads, size, head_dim)
        if self.keys is not None:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values


def make_kv_caches(num_layers: int, capacity: int | None = None) -> list[KVCache]:
    return [KVCache(capacity) for _ in range(num_layers)]
