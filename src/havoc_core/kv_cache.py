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
             dtype: torch.dtype | None = None, lengths: list[int] | None = None) -> CacheView:
        """A forward pass whose row b continues cache row ``rows[b]`` (ascending) at position
        ``starts[b]``. ``logits_at``: -1 for each row's last position, a [B] tensor of one position
        per row, or None for every position. ``dtype``: the activations' dtype (None: the weights').
        ``lengths``: each row's real new tokens when shorter rows are right-padded (None: all are)."""
        device = self.k[0].device
        lo, n = rows[0], len(rows)
        contiguous = rows[-1] - lo + 1 == n
        if n == 1 or len(set(starts)) == 1 and contiguous and (lengths is None or len(set(lengths)) == 1):
            # contiguous rows at one position, no padding: plain slices, each row computed as alone
            return CacheView(self, slice(lo, lo + n), starts[0], logits_at, dtype)
        row_index = slice(lo, lo + n) if contiguous else torch.tensor(rows, device=device)
        return CacheView(self, row_index, torch.tensor(starts, device=device), logits_at, dtype, list(starts), lengths)


@dataclass
class CacheView:
    """Rows of a ``KVCache`` as one forward pass continues them (made by ``KVCache.view``)."""

    cache: KVCache
    rows: slice | Tensor  # a slice of contiguous rows, or an index of scattered ones
    start: int | Tensor  # one first position for every row, or one per row ([B])
    logits_at: Tensor | int | None = None
    dtype: torch.dtype | None = None
    starts: list[int] | None = None  # rows at different positions or lengths: each row's start ...
    lengths: list[int] | None = None  # ... and real new tokens (None: all T)

    def prepare(self, T: int) -> tuple[Tensor, Tensor | None, list[LayerView]]:
        """For T new tokens per row: their positions ([T], or [B, T] when rows differ), the attention
        mask (None when plain causal attention is right, or the rows differ: see ``runs``) and each
        layer's view."""
        device = self.cache.k[0].device
        steps = torch.arange(T, device=device)
        if isinstance(self.start, int):
            end = self.start + T
            if end > self.cache.max_len:
                raise HavocError(f"sequence of {end} tokens exceeds the cache's {self.cache.max_len} positions "
                                 "(max_seq_len)")
            positions, mask, length, runs = self.start + steps, _after(self.start, T, device), end, None
        else:
            positions = self.start[:, None] + steps  # [B, T]
            length = int(self.start.max()) + T
            if length > self.cache.max_len:
                raise HavocError(f"sequence of {length} tokens exceeds the cache's {self.cache.max_len} positions "
                                 "(max_seq_len)")
            mask, runs = None, self._runs(T, device)
        layers = [LayerView(k, v, self.rows, self.start, length, runs) for k, v in zip(self.cache.k, self.cache.v,
                                                                                         strict=True)]
        return positions, mask, layers

    def _runs(self, T: int, device: torch.device) -> list[tuple[int, int, int, int, Tensor | None]]:
        """(first row, end row, start, new tokens, mask) of each run of adjacent rows alike in start
        and new tokens: the attention then treats each run as a pass of it alone (same shapes, same
        mask), so a row's result does not depend on the rows beside it."""
        assert self.starts is not None
        each = list(zip(self.starts, self.lengths or [T] * len(self.starts), strict=True))
        runs, b = [], 0
        while b < len(each):
            e = b + 1
            while e < len(each) and each[e] == each[b]:
                e += 1
            start, n = each[b]
            runs.append((b, e, start, n, _after(start, n, device)))
            b = e
        return runs


def _after(start: int, T: int, device: torch.device) -> Tensor | None:
    """The mask of T new tokens after ``start`` cached ones: each sees the whole prefix and its own
    past (None: a single token, or plain causal attention from position 0)."""
    if T == 1 or start == 0:
        return None
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class LayerView:
    """One layer's keys/values for one pass: writes the new ones at each row's position (in the
    cache's dtype) and returns what the queries attend to (positions [0, length)), as stored."""

    def __init__(self, k: Tensor, v: Tensor, rows: slice | Tensor, start: int | Tensor, length: int,
                 runs: list[tuple[int, int, int, int, Tensor | None]] | None = None) -> None:
        self.k, self.v, self.rows, self.start, self.length, self.runs = k, v, rows, start, length, runs

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(self.start, int):
            ck, cv = self.k[self.rows], self.v[self.rows]
            ck[:, :, self.start : self.length] = k
            cv[:, :, self.start : self.length] = v
            return ck[:, :, : self.length], cv[:, :, : self.length]
        rows = self.rows if isinstance(self.rows, Tensor) else torch.arange(self.rows.start, self.rows.stop,
                                                                            device=k.device)
        cols = self.start[:, None] + torch.arange(k.shape[2], device=k.device)
        self.k[rows[:, None], :, cols] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, cols] = v.transpose(1, 2).to(self.v.dtype)
        if isinstance(self.rows, slice):  # contiguous rows: a view, no copy
            return self.k[self.rows, :, : self.length], self.v[self.rows, :, : self.length]
        return self.k[:, :, : self.length].index_select(0, rows), self.v[:, :, : self.length].index_select(0, rows)
