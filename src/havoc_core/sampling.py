"""How the next token is picked: ``SamplingParams`` and the batched sampler.

``sample_tokens`` samples every row of a batch in one call, each row with its own parameters and
random generator, with row-wise operations only, so a seeded request gets the same tokens whatever
else shares its batch. CLI flags are generated from ``SamplingParams``' fields and their ``help``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from havoc_core.errors import HavocError


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# a temperature this small is greedy (vLLM's rule): dividing by it would overflow the logits to inf
GREEDY_BELOW = 1e-5


class SamplingError(HavocError):
    """A sampling parameter out of range; ``field`` names the ``SamplingParams`` field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off;
    ``seed`` makes a request reproducible whatever else is in the batch."""

    max_new_tokens: int = field(default=256, metadata={"help": "longest reply in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus threshold in (0, 1]; 1 = off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL's penalty on tokens seen; 1 = off"})
    seed: int | None = field(default=None, metadata={"help": "reproducible sampling"})
    stop: Sequence[str] = field(default=(), metadata={"help": "stop before this string (repeatable)"})
    stop_ids: Sequence[int] = field(default=(), metadata={"cli": False})  # besides the model's eos, which always stops
    # benchmarks: always generate max_new_tokens (stop strings still apply)
    ignore_eos: bool = field(default=False, metadata={"help": "generate max_new_tokens even past <|eos|>"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract from the logit of every token generated so far, in [-2, 2]; 0 = off"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract this times each token's count so far, in [-2, 2]; 0 = off"})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens less likely than min_p times the most likely one, in [0, 1]; 0 = off"})
    # token id -> added to its logit, in [-100, 100] (OpenAI's logit_bias); the engine checks the ids
    no_repeat_ngram_size: int = field(default=0, metadata={
        "help": "never repeat a span of this many tokens within a reply (transformers' name); 0 = off"})
    logit_bias: Mapping[int, float] = field(default_factory=dict, metadata={"cli": False})
    n: int = field(default=1, metadata={"cli": False})  # independent samples of one prompt (Engine.generate)
    logprobs: int | None = field(default=None, metadata={"cli": False})  # report this many alternatives (0-20)
    # enforced token by token (grammar.py); on the command line a file or inline JSON
    json_schema: Mapping[str, Any] | None = field(default=None, metadata={
        "cli": "json", "help": "the reply is JSON valid against this schema (a file or inline JSON)"})

    def samples(self) -> list[SamplingParams]:
        """The ``n`` single-sample params of this request: sample j is seeded with ``seed + j``."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None else self.seed + j) for j in range(self.n)]

    def validate(self) -> SamplingParams:
        """SamplingError naming the first value out of range; returns self for chaining."""
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", self.temperature, _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size,
             isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0, "an integer >= 0"),
            ("top_p", self.top_p, _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty,
             _finite(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100, "a number in [0.01, 100]"),
            ("presence_penalty", self.presence_penalty,
             _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "a number in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty,
             _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "a number in [-2, 2]"),
            ("min_p", self.min_p, _finite(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("n", self.n, _int(self.n) and 1 <= self.n <= 8, "an integer in [1, 8]"),
            ("logprobs", self.logprobs, self.logprobs is None or _int(self.logprobs) and 0 <= self.logprobs <= 20,
             "null or an integer in [0, 20]"),
            ("logit_bias", self.logit_bias, isinstance(self.logit_bias, Mapping) and all(
                _int(k) and k >= 0 and _finite(v) and -100 <= v <= 100 for k, v in self.logit_bias.items()),
             "token ids >= 0 mapped to numbers in [-100, 100]"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise SamplingError(name, f"expected {expected}, found {value!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, Mapping):
            raise SamplingError("json_schema", f"expected a JSON schema object, found {self.json_schema!r}")
        if self.json_schema is not None and self.ignore_eos:
            raise SamplingError("ignore_eos", "not with json_schema: a complete document ends the reply")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"expected non-empty strings, found {list(self.stop)!r}")
        return self


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 seen: Tensor | None = None) -> int:
    """One token id from logits [V]: repetition penalty (CTRL: divide positive logits, multiply
    negative ones, for every id in ``seen``), then greedy or temperature / top-k / top-p sampling."""
    return sample_tokens(logits[None], [params], [generator], [seen])[0]


def sample_tokens(logits: Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], seen: Sequence[Tensor | None],
                  counts: Sequence[Tensor | None] | None = None,
                  replies: Sequence[Sequence[int]] | None = None) -> list[int]:
    """``sample_token`` for every row of logits [N, V] at once, each row with its own params,
    generator, seen ids, ``counts`` (float [V]: how often each id was generated, for the
    presence/frequency penalties) and ``replies`` (the ids generated so far, for no_repeat_ngram_size).
    Every row draws from its own generator (one uniform, sampling
    rows only) and every operation is row-wise, so a seeded request gets the same tokens in any batch."""
    logits = logits.float()
    if any(p.presence_penalty or p.frequency_penalty or p.logit_bias for p in params):
        logits = _openai_penalties(logits, params, counts)
    if replies is not None and any(p.no_repeat_ngram_size for p in params):
        logits = _ban_repeats(logits, params, replies)
    n, vocab = logits.shape
    penalties = [p.repetition_penalty if s is not None else 1.0 for p, s in zip(params, seen, strict=True)]
    if any(r != 1.0 for r in penalties):
        mask = torch.zeros(n, vocab, dtype=torch.bool)
        for i, s in enumerate(seen):
            if s is not None and penalties[i] != 1.0:
                mask[i] = s
        pen = torch.tensor(penalties, dtype=logits.dtype)[:, None]
        logits = torch.where(mask, torch.where(logits > 0, logits / pen, logits * pen), logits)
    tokens = [0] * n
    greedy = [i for i, p in enumerate(params) if p.temperature < GREEDY_BELOW]
    if greedy:
        # numpy's argmax (the same first maximum): 3 us over 32k logits, ATen's 48 us (docs/LOG.md)
        picked = (logits if len(greedy) == n else logits[greedy]).detach().cpu().numpy().argmax(-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            tokens[i] = t
    rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not rows:
        return tokens
    ps = [params[i] for i in rows]
    x = logits if len(rows) == n else logits[rows]
    x = x / torch.tensor([p.temperature for p in ps], dtype=x.dtype)[:, None]
    if any(p.min_p > 0 for p in ps):  # probability >= min_p * the top one's, in logit space
        floor = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in ps], dtype=x.dtype)[:, None]
        x = x.masked_fill(x < x.max(-1, keepdim=True).values + floor, -math.inf)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in ps]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values
        kth = top.gather(-1, torch.tensor([max(k, 1) - 1 for k in ks])[:, None])
        kth = torch.where(torch.tensor(ks)[:, None] > 0, kth, -math.inf)
        x = x.masked_fill(x < kth, -math.inf)
    if any(p.top_p < 1.0 for p in ps):
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in ps], dtype=x.dtype)[:, None]
        # values only: numpy's SIMD sort is ~4x faster than torch.sort, which also orders the indices
        if x.device.type == "cpu":
            sorted_logits = torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))
        else:
            sorted_logits = torch.sort(x, dim=-1, descending=True).values
        probs = sorted_logits.softmax(-1)
        # the smallest prefix reaching top_p, never empty (a top_p below float32's range rounds to 0)
        keep = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True).clamp(min=1)
        x = x.masked_fill(x < sorted_logits.gather(-1, keep - 1), -math.inf)  # ties with its last one stay
    # inverse CDF: one uniform draw (torch.multinomial draws V exponentials: ~7x slower per row at V=8192,
    # a large share of a batched decode step on CPU)
    cdf = x.softmax(-1).cumsum(-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]) * cdf[:, -1]
    picked = torch.searchsorted(cdf, u[:, None].to(cdf.dtype), right=True).clamp(max=vocab - 1)[:, 0].tolist()
    for i, t in zip(rows, picked, strict=True):
        tokens[i] = t
    return tokens


def _openai_penalties(logits: Tensor, params: Sequence[SamplingParams],
                      counts: Sequence[Tensor | None] | None) -> Tensor:
    """OpenAI's definitions, on a copy: ``logit -= count * frequency_penalty + (count > 0) *
    presence_penalty`` (counts of generated tokens), then ``logit += logit_bias[id]``. A row loop:
    only rows that set them pay, and the plain path never gets here."""
    logits = logits.clone()
    for i, p in enumerate(params):
        c = counts[i] if counts is not None else None
        if c is not None and (p.presence_penalty or p.frequency_penalty):
            logits[i] -= c * p.frequency_penalty + (c > 0).to(logits.dtype) * p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor([int(k) for k in p.logit_bias])
            logits[i, ids] += torch.tensor([float(v) for v in p.logit_bias.values()], dtype=logits.dtype)
    return logits


def repeated_ngram_bans(reply: Sequence[int], n: int) -> set[int]:
    """The ids that would end a second copy of an ``n``-token span of ``reply``: each id that once
    followed the reply's last ``n - 1`` ids."""
    if n <= 0 or len(reply) < n - 1:
        return set()
    if n == 1:
        return set(reply)
    tail = list(reply[len(reply) - n + 1:])
    return {reply[i + n - 1] for i in range(len(reply) - n + 1) if list(reply[i:i + n - 1]) == tail}


def _ban_repeats(logits: Tensor, params: Sequence[SamplingParams], replies: Sequence[Sequence[int]]) -> Tensor:
    """-inf for every id :func:`repeated_ngram_bans` names (a copy; only rows that ask pay)."""
    logits = logits.clone()
    for i, (p, reply) in enumerate(zip(params, replies, strict=True)):
        banned = repeated_ngram_bans(reply, p.no_repeat_ngram_size)
        if banned:
            logits[i, list(banned)] = -math.inf
    return logits
