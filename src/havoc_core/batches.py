"""Training batches. Data order is a pure function of ``(seed, step, global row index)``: each row of
a global batch is drawn from its own RNG stream, so resuming needs only the step, and a global batch
is the same rows whether it is split over 1 or N ranks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from havoc_core.data import open_split
from havoc_core.errors import HavocError
from havoc_core.model import IGNORE_INDEX


class PretrainBatches:
    """Random windows of ``seq_len + 1`` tokens from uint32 shards; row ``g`` of step ``s`` comes
    from RNG stream ``(seed, s, g)``, so the data position is just the step."""

    def __init__(self, data_dir: str, split: str, seq_len: int, seed: int) -> None:
        self.shards = [s for s in open_split(data_dir, split) if len(s) > seq_len + 1]
        if not self.shards:
            raise HavocError(f"{data_dir}: the {split} split has no shard longer than seq_len+1={seq_len + 1} tokens")
        lengths = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.weights = lengths / lengths.sum()
        self.seq_len, self.seed = seq_len, seed

    def rows(self, step: int, rows: range) -> tuple[Tensor, Tensor]:
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for i, g in enumerate(rows):
            rng = np.random.default_rng([self.seed, step, g])
            shard = self.shards[rng.choice(len(self.shards), p=self.weights) if len(self.shards) > 1 else 0]
            start = int(rng.integers(0, len(shard) - self.seq_len - 1))
            out[i] = shard[start : start + self.seq_len + 1]
        t = torch.from_numpy(out)
        return t[:, :-1], t[:, 1:]


class SFTBatches:
    """Whole conversations, reshuffled every epoch; targets are -100 outside assistant tokens."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int, seed: int) -> None:
        if not examples:
            raise HavocError("sft: no conversations to train on")
        self.examples, self.pad_id, self.seed = examples, pad_id, seed

    def _example(self, index: int) -> tuple[list[int], list[int]]:
        epoch, i = divmod(index, len(self.examples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self.examples[order[i]]

    def rows(self, step: int, rows: range, global_batch: int) -> tuple[Tensor, Tensor]:
        picked = [self._example(step * global_batch + g) for g in rows]
        width = max(len(ids) for ids, _ in picked) - 1
        x = torch.full((len(picked), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(picked), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, mask) in enumerate(picked):
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            n = len(ids) - 1
            x[i, :n] = ids_t[:-1]
            y[i, :n] = torch.where(mask_t[1:], ids_t[1:], IGNORE_INDEX)
        return x, y


