"""The KV cache, and the view of it that one forward pass reads: which rows, at which positions.

Everything a cached forward pass needs beyond the token ids travels in a ``CacheView``: the rows
of the cache it continues, each row's first position (which sets the rotary angles and, with the
cache's contents, the attention mask), which positions need logits and the activations' dtype.
The training forward pass never sees any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from havoc_core.errors import HavocError


class KVCache:
    """Preallocated keys/values of every layer, [batch, num_kv_heads, max_len, head_dim] each.

    Only the KV heads are cached (grouped-query attention): the query heads share them. A row is
    one sequence (an engine slot); rows sit at different positions.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def view(self, rows: list[int], starts: list[int], *, logits_at: Tensor | int | None = None,
             dtype: torch.dtype | None = None) -> CacheView:
        """A forward pass whose row b continues cache row ``rows[b]`` (ascending) at position
        ``starts[b]``. ``logits_at``: -1 for each row's last position, a [B] tensor of one position
        per row, or None for every position. ``dtype``: the activations' dtype (None: the weights')."""
        device = self.k[0].device
        lo, n = rows[0], len(rows)
        if n == 1 or len(set(starts)) == 1 and rows[-1] - lo + 1 == n:
            row_index: slice | Tensor = slice(lo, lo + n)  # contiguous rows at one position: plain slices
            start: int | Tensor = starts[0]
        else:
            contiguous = rows[-1] - lo + 1 == n
            row_index = slice(lo, lo + n) if contiguous else torch.tensor(rows, device=device)
            start = torch.tensor(starts, device=device)
        return CacheView(self, row_index, start, logits_at, dtype)


@dataclass
class CacheView:
    """Rows of a ``KVCache`` as one forward pass continues them (made by ``KVCache.view``)."""

    cache: KVCache
    rows: slice | Tensor  # a slice of contiguous rows, or an index of scattered ones
    start: int | Tensor  # one first position for every row, or one per row ([B])
    logits_at: Tensor | int | None = None
    dtype: torch.dtype | None = None

    def prepare(self, T: int) -> tuple[Tensor, Tensor | None, list[LayerView]]:
        """For T new tokens per row: their positions ([T], or [B, T] when rows differ), the attention
        mask (None when plain causal attention is right) and each layer's view."""
        device = self.cache.k[0].device
        steps = torch.arange(T, device=device)
        if isinstance(self.start, int):
            end = self.start + T
            if end > self.cache.max_len:
                raise HavocError(f"sequence of {end} tokens exceeds the cache's {self.cache.max_len} positions "
                                 "(max_seq_len)")
            positions = self.start + steps
            # new tokens after cached ones: each sees the whole prefix and its own past
            mask = (torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=self.start)
                    if T > 1 and self.start > 0 else None)
            length = end
        else:
            positions = self.start[:, None] + steps  # [B, T]
            length = int(self.start.max()) + T
            if length > self.cache.max_len:
                raise HavocError(f"sequence of {length} tokens exceeds the cache's {self.cache.max_len} positions "
                                 "(max_seq_len)")
            mask = (torch.arange(length, device=device) <= positions[..., None])[:, None]  # [B, 1, T, S]
        layers = [LayerView(k, v, self.rows, self.start, length) for k, v in zip(self.cache.k, self.cache.v,
                                                                                   strict=True)]
        return positions, mask, layers


class LayerView:
    """One layer's keys/values for one pass: writes the new ones at each row's position and returns
    what the queries attend to (positions [0, length)), in the new keys' dtype, so a bf16 cache also
    serves an fp32 prefill."""

    def __init__(self, k: Tensor, v: Tensor, rows: slice | Tensor, start: int | Tensor, length: int) -> None:
        self.k, self.v, self.rows, self.start, self.length = k, v, rows, start, length

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(self.start, int):
            ck, cv = self.k[self.rows], self.v[self.rows]
            ck[:, :, self.start : self.length] = k
            cv[:, :, self.start : self.length] = v
            return ck[:, :, : self.length].to(k.dtype), cv[:, :, : self.length].to(v.dtype)
        rows = self.rows if isinstance(self.rows, Tensor) else torch.arange(self.rows.start, self.rows.stop,
                                                                            device=k.device)
        cols = self.start[:, None] + torch.arange(k.shape[2], device=k.device)
        self.k[rows[:, None], :, cols] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, cols] = v.transpose(1, 2).to(self.v.dtype)
        if isinstance(self.rows, slice):  # contiguous rows: a view, no copy
            return (self.k[self.rows, :, : self.length].to(k.dtype), self.v[self.rows, :, : self.length].to(v.dtype))
        return (self.k[:, :, : self.length].index_select(0, rows).to(k.dtype),
                self.v[:, :, : self.length].index_select(0, rows).to(v.dtype))
