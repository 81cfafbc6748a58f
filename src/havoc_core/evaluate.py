"""Evaluation: validation loss, perplexity and bits per byte, in training and of any checkpoint."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from havoc_core.batches import SFTBatches
from havoc_core.checkpoint import find_checkpoint
from havoc_core.data import load_conversations, open_split
from havoc_core.errors import HavocError
from havoc_core.model import IGNORE_INDEX, load_model
from havoc_core.tokenizer import HavocTokenizer


@torch.no_grad()
def loss_sums(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
              autocast: AbstractContextManager[Any] | None = None) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (nats) and counted target tokens over ``batches`` of (inputs, targets),
    as tensors on the targets' device (so distributed runs can all-reduce them). The model's
    training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    nats = tokens = None
    for x, y in batches:
        with autocast or nullcontext():
            loss = model(x, y)
        n = (y != IGNORE_INDEX).sum()
        nats = loss.float() * n if nats is None else nats + loss.float() * n
        tokens = n if tokens is None else tokens + n
    model.train(was_training)
    if nats is None or tokens is None:
        raise HavocError("evaluation: no batches to evaluate")
    return nats, tokens


def evaluate_checkpoint(checkpoint: str, data: str, batch_size: int = 8, max_batches: int = 50,
                        seq_len: int = 0) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte of a checkpoint on a prepared dir's val split
    (sequential windows) or a conversations JSONL (assistant tokens)."""
    model = load_model(checkpoint)
    tok = HavocTokenizer.load(find_checkpoint(checkpoint))
    seq_len = seq_len or model.config.max_seq_len
    batches: Iterator[tuple[Tensor, Tensor]]
    if Path(data).is_dir():
        stream = np.concatenate([np.asarray(s) for s in open_split(data, "val")]).astype(np.int64)
        n_win = min(max_batches * batch_size, (len(stream) - 1) // seq_len)
        if n_win == 0:
            raise HavocError(f"{data}: val split shorter than one window of {seq_len + 1} tokens")
        windows = torch.from_numpy(stream[: n_win * seq_len + 1])
        xs = windows[:-1].view(n_win, seq_len)
        ys = windows[1:].view(n_win, seq_len)
        batches = ((xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n_win, batch_size))
    elif Path(data).is_file():
        examples = load_conversations(data, tok, model.config.max_seq_len)
        sft = SFTBatches(examples, tok.pad_id, 0)
        n = min(len(examples), max_batches * batch_size)
        batches = (sft.rows(0, range(i, min(i + batch_size, n)), 0) for i in range(0, n, batch_size))
    else:
        raise HavocError(f"{data}: no such data dir or conversations file")
    n_bytes = 0

    def counted() -> Iterator[tuple[Tensor, Tensor]]:  # the targets' UTF-8 bytes, for bits per byte
        nonlocal n_bytes
        for x, y in batches:
            n_bytes += sum(len(tok.decode(row[row != IGNORE_INDEX].tolist()).encode("utf-8")) for row in y)
            yield x, y

    nats, tokens = (float(t) for t in loss_sums(model, counted()))
    loss = nats / max(1, tokens)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": int(tokens),
            "bits_per_byte": nats / math.log(2) / max(1, n_bytes)}

