"""The generation engine: slots over one preallocated KV cache, prefill then decode, continuous batching.

The engine has ``max_batch`` slots; each slot is one row of the KV cache ([slots, n_kv, ctx, hd]:
grouped-query attention caches the KV heads only) with its own position, so requests of different
lengths join and leave between decode steps (continuous batching)::

    engine = Engine(model, tokenizer, max_batch=8)
    slot = engine.add(prompt_ids, SamplingParams(temperature=0.7))  # prefill into a free slot
    while engine.active():
        for event in engine.step():       # one token for every running slot
            print(event.slot, event.text, event.finish_reason)
    engine.result(slot)                   # Completion(ids, text, finish_reason, ...)
    engine.remove(slot)                   # free it (or keep it: add(..., slot=slot) reuses its cache)

``add`` prefills only what the slot's cache does not already hold (a chat turn: its new tokens).
``Event.text`` is whole UTF-8 characters, never into a stop string. ``generate`` (prompts ->
completions, queueing beyond ``max_batch``) and ``stream`` (text deltas of one request) drive the
engine; a server calls ``add``/``step``/``remove`` from one thread. The weights are never changed:
prepare it first (``inference.prepare_model``). ``SamplingParams.json_schema``: grammar.py.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from havoc_core.detokenize import TextStream
from havoc_core.errors import HavocError
from havoc_core.grammar import Constraint, Grammars, mask_logits
from havoc_core.inference import InferenceLinear, layouts_in_huge_pages
from havoc_core.model import HavocModel
from havoc_core.precision import compile_decode
from havoc_core.precision import prefill_dtype as default_prefill_dtype
from havoc_core.sampling import SamplingParams, sample_tokens

FinishReason = Literal["stop", "length", "abort"]
Prompt = Sequence[int] | str  # token ids, or text the engine tokenizes


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log-softmax in fp32 of its raw logits, before any
    sampling parameter) and the ``top`` most likely (id, logprob) at that position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One step of one request: the token just produced (the stop token too) and the text it adds."""

    slot: int
    token: int
    text: str
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass
class Completion:
    prompt_tokens: int
    ids: list[int]  # generated ids, without the stop token
    text: str
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None  # one per id, when the request asked for them


class SlotState(enum.Enum):
    PREFILLED = "prefilled"  # the prompt is in the cache; its first token is sampled, not yet reported
    RUNNING = "running"  # decoding: each step feeds the pending token and samples the next
    FINISHED = "finished"  # done (stop, length or abort); the cache stays for prefix reuse


@dataclass
class Slot:
    """One request in one cache row."""

    tokens: list[int]  # ids whose keys/values sit in the cache at positions 0 .. len-1
    params: SamplingParams
    prompt_len: int
    cached: int  # prompt tokens the cache already held when it was added (not prefilled)
    state: SlotState = SlotState.PREFILLED
    generated: list[int] = field(default_factory=list)
    pending: int = 0  # sampled, not yet in the cache
    finish_reason: FinishReason | None = None
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    seen: Tensor | None = None  # ids seen so far, for the repetition penalty
    counts: Tensor | None = None  # how often each id was generated, for presence/frequency penalties
    logprobs: list[TokenLogprob] | None = None  # one per sampled token, when asked for
    constraint: Constraint | None = None  # params.json_schema's grammar, at this reply's position

    @property
    def active(self) -> bool:
        return self.state is not SlotState.FINISHED


class Engine:
    """Slot-based batch decoder over one preallocated KV cache (see the module docstring)."""

    PREFILL_TOKENS = 4096  # padded prompt tokens per batched prefill pass

    def __init__(self, model: HavocModel, tokenizer: Any = None, *, max_batch: int = 1,
                 prefill_dtype: torch.dtype | None = None, compile: bool = False) -> None:
        """``prefill_dtype``: the activations' dtype of a prefill (default: ``precision.prefill_dtype``).
        ``compile``: torch.compile the decode step (``precision.compile_decode``: slow first steps)."""
        if model.training:
            raise HavocError("engine: expected a model in eval mode (model.eval() or inference.prepare_model)")
        self.model, self.tokenizer = model, tokenizer
        self.max_len, self.device = model.config.max_seq_len, model.embed.weight.device
        if one_slot := max_batch == 1 and self.device.type == "cpu":  # a chat
            layouts_in_huge_pages(model)
        # a chat's keys and values in fp32, as attention on CPU computes (a bf16 cache was upcast every step)
        self.cache = model.make_cache(max_batch, self.max_len, torch.float32 if one_slot else None)
        self.slots: list[Slot | None] = [None] * max_batch
        self.prefill_dtype = prefill_dtype or default_prefill_dtype(model.embed.weight.dtype, self.device)
        self.stop_ids, self._decode = {model.config.eos_token_id}, compile_decode(model, one_slot) if compile else model
        self._grammars: Grammars | None = None  # built at the first request with a json_schema

    # ------------------------------------------------------------------ requests

    def add(self, prompt: Prompt, params: SamplingParams | None = None, *,
            slot: int | None = None) -> int:
        """Prefill ``prompt`` into ``slot`` (default: the first free one), reusing whatever prefix of
        it the slot's cache already holds, and sample the first token (reported by the next step)."""
        return self.add_batch([(prompt, params, slot)])[0]

    def add_batch(self, requests: Sequence[tuple[Prompt, SamplingParams | None, int | None]]) -> list[int]:
        """``add`` for several (prompt, params, slot) requests in one prefill forward pass: requests
        that arrive together cost about one prefill instead of one each (8 prompts of 20 tokens on
        havoc-tiny: 17 ms vs 8 x 5 ms). Everything is checked before anything changes."""
        rows: list[tuple[int, list[int], int, SamplingParams]] = []  # slot, ids, cached prefix, params
        taken: set[int] = set()
        for prompt, params, slot in requests:
            params = (params or SamplingParams()).validate()
            vocab = self.model.config.vocab_size
            if any(int(k) >= vocab for k in params.logit_bias):
                raise HavocError(f"logit_bias: token ids must be below the vocabulary size {vocab}, found "
                                 f"{max(int(k) for k in params.logit_bias)}")
            if params.json_schema is not None:
                self.grammars().compile(params.json_schema)  # SchemaError before anything changes
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise HavocError("prompt: expected at least one token, found an empty prompt")
            if len(ids) >= self.max_len:
                raise HavocError(f"prompt: {len(ids)} tokens leave no room to generate in the context of "
                                 f"max_seq_len={self.max_len}")
            if slot is None:
                slot = next((i for i, s in enumerate(self.slots) if s is None and i not in taken), None)
                if slot is None:
                    raise HavocError(f"engine: all {len(self.slots)} slots are busy")
            old = self.slots[slot]
            if old is not None and old.active:
                raise HavocError(f"slot {slot}: still generating")
            if slot in taken:
                raise HavocError(f"slot {slot}: given twice in one batch")
            taken.add(slot)
            rows.append((slot, ids, _common_prefix(old.tokens if old else [], ids, limit=len(ids) - 1), params))
        states = []
        for slot, ids, keep, params in rows:
            # the cache holds ids[:keep]; an interrupted prefill leaves that true
            self.slots[slot] = Slot(tokens=ids[:keep], params=params, prompt_len=len(ids), cached=keep)
            states.append(self.slots[slot])
        # identical prompts (the n samples of one request) are prefilled once; copies get its cache rows
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(ids), j) for j, (_, ids, _, _) in enumerate(rows)]
        unique = sorted(set(source))
        logits = self._prefill_rows([(rows[j][0], rows[j][1][rows[j][2]:], rows[j][2]) for j in unique])
        for j, (slot, ids, _, _) in enumerate(rows):
            if source[j] != j:
                src = rows[source[j]][0]
                for t in (*self.cache.k, *self.cache.v):
                    t[slot, :, : len(ids)] = t[src, :, : len(ids)]
        if len(unique) < len(rows):
            logits = logits[[unique.index(src) for src in source]]
        for state, (_, ids, _keep, params) in zip(states, rows, strict=True):
            state.tokens = ids
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            state.generator = torch.Generator().manual_seed(seed)
            if params.repetition_penalty != 1.0:
                state.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
                state.seen[ids] = True
            if params.presence_penalty or params.frequency_penalty:
                state.counts = torch.zeros(logits.shape[-1])
            if params.logprobs is not None:
                state.logprobs = []
            if self.tokenizer is not None:
                state.stream = TextStream(self.tokenizer, params.stop)
            state.constraint = None if params.json_schema is None else self.grammars().matcher(params.json_schema)
        self._sample_rows(states, logits)
        return [slot for slot, *_ in rows]

    def grammars(self) -> Grammars:
        if self._grammars is None:  # on first use: the token table takes ~0.1 s to build
            if self.tokenizer is None:
                raise HavocError("json_schema: the engine needs the model's tokenizer to enforce a schema")
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.model.config.eos_token_id)
        return self._grammars

    def step(self) -> list[Event]:
        """Advance every active slot by one token: prefilled slots report the token their prefill
        sampled, running slots decode one (all of them in one batched forward pass)."""
        running = [i for i, s in enumerate(self.slots) if s is not None and s.state is SlotState.RUNNING]
        prefilled = [i for i, s in enumerate(self.slots) if s is not None and s.state is SlotState.PREFILLED]
        events = []
        if running:
            states = [self._slot(i) for i in running]
            logits = self._decode_step(running, states)
            for s in states:
                s.tokens.append(s.pending)
            self._sample_rows(states, logits)
            events += [self._report(i, s) for i, s in zip(running, states, strict=True)]
        for i in prefilled:
            s = self._slot(i)
            s.state = SlotState.RUNNING
            events.append(self._report(i, s))
        return events

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None and s.active]

    def free_slot(self, prompt: Sequence[int], exclude: Container[int] = ()) -> int | None:
        """The idle slot whose cache holds the longest prefix of ``prompt`` (the lowest such slot,
        empty ones count as 0), or None if every slot is generating: a server's pick for ``add``,
        so a conversation's next turn lands where its earlier turns are cached. Slots in
        ``exclude`` (already picked for the same ``add_batch``) are not considered."""
        best, best_len = None, -1
        for i, s in enumerate(self.slots):
            if (s is not None and s.active) or i in exclude:
                continue
            n = _common_prefix(s.tokens, prompt, limit=len(prompt)) if s is not None else 0
            if n > best_len:
                best, best_len = i, n
        return best

    def finish(self, slot: int) -> None:
        """Stop a request early (client gone, Ctrl-C); its slot and cache stay for reuse."""
        s = self.slots[slot]
        if s is not None and s.active:
            s.state, s.finish_reason = SlotState.FINISHED, "abort"

    def remove(self, slot: int) -> None:
        self.slots[slot] = None

    def result(self, slot: int) -> Completion:
        s = self.slots[slot]
        if s is None:
            raise HavocError(f"slot {slot}: empty")
        text = s.stream.text if s.stream is not None else ""
        logprobs = s.logprobs[: len(s.generated)] if s.logprobs is not None else None
        return Completion(s.prompt_len, list(s.generated), text, s.finish_reason, logprobs)

    @torch.inference_mode()
    def score(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each token's logprob given the ones before it (the first has no context: None), and the
        ``top`` most likely at each position: one full forward pass outside the cache, in the
        model's dtype, log-softmax in fp32 (what `echo` + `logprobs` report for a prompt)."""
        ids = [int(t) for t in ids]
        if not ids or len(ids) > self.max_len:
            raise HavocError(f"prompt: expected 1 to {self.max_len} tokens to score, found {len(ids)}")
        logits = self.model(torch.tensor([ids], device=self.device))[0, :-1].float().cpu()
        lp = logits.log_softmax(-1)
        picked = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        tops = _top(lp, top)
        return [None] + [TokenLogprob(t, v, k) for t, v, k in zip(ids[1:], picked, tops, strict=True)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               slot: int | None = None) -> Iterator[str]:
        """Text deltas of one request; leaving the loop early (or Ctrl-C) ends the request.
        ``result(slot)`` has the ids afterwards (the slot is kept, for prefix reuse)."""
        slot = self.add(prompt, params, slot=slot)
        try:
            while self._is_active(slot):
                for event in self.step():
                    if event.slot == slot and event.text:
                        yield event.text
        finally:
            self.finish(slot)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Completion]:
        """Complete every prompt, ``max_batch`` at a time; a finished request's slot goes to the next
        prompt. With ``params.n`` > 1, n completions per prompt (prompt-major), sample j seeded with
        ``seed + j``; copies that are prefilled together share one prefill."""
        samples = (params or SamplingParams()).validate().samples()
        jobs = [(prompt, p) for prompt in prompts for p in samples]
        results: list[Completion | None] = [None] * len(jobs)
        owner: dict[int, int] = {}
        queue = list(range(len(jobs)))
        while queue or owner:
            free = sum(s is None for s in self.slots)
            if queue and free:  # every prompt that fits joins in one batched prefill
                batch, queue = queue[:free], queue[free:]
                for slot, j in zip(self.add_batch([(*jobs[j], None) for j in batch]), batch, strict=True):
                    owner[slot] = j
            self.step()
            for slot in [i for i in owner if not self._is_active(i)]:
                results[owner.pop(slot)] = self.result(slot)
                self.remove(slot)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ internals

    def _slot(self, i: int) -> Slot:
        s = self.slots[i]
        assert s is not None, f"slot {i} is empty"
        return s

    def _is_active(self, slot: int) -> bool:
        s = self.slots[slot]
        return s is not None and s.active

    def _report(self, i: int, s: Slot) -> Event:
        token = s.pending
        stream = s.stream
        if not s.params.ignore_eos and (token in self.stop_ids or token in s.params.stop_ids):
            return self._end(i, s, token, stream.finish() if stream else "", "stop")
        s.generated.append(token)
        text = stream.push(token) if stream else ""
        logprob = s.logprobs[-1] if s.logprobs else None
        if stream is not None and stream.stopped:
            return self._end(i, s, token, text, "stop", logprob)
        if len(s.generated) >= s.params.max_new_tokens or len(s.tokens) + 1 >= self.max_len:
            return self._end(i, s, token, text + (stream.finish() if stream else ""), "length", logprob)
        return Event(i, token, text, None, logprob)

    def _end(self, i: int, s: Slot, token: int, text: str, reason: FinishReason,
             logprob: TokenLogprob | None = None) -> Event:
        s.state, s.finish_reason = SlotState.FINISHED, reason
        return Event(i, token, text, reason, logprob)

    def _sample_rows(self, states: list[Slot], logits: Tensor) -> None:
        """Sample every state's next (pending) token from its row of logits [N, V], in one batch."""
        if torch.isnan(logits.sum()):  # a sum is ~5x cheaper than isnan(logits).any() at [8, 8192]
            raise HavocError("the model produced NaN logits: its weights are broken (diverged training or a bad file)")
        tokens = sample_tokens(mask_logits(logits, [s.constraint for s in states]), [s.params for s in states],
                               [s.generator for s in states], [s.seen for s in states], [s.counts for s in states],
                               [s.generated for s in states])
        want = [j for j, s in enumerate(states) if s.logprobs is not None]
        if want:  # only requests that ask pay for the log-softmax
            lp = (logits if len(want) == len(states) else logits[want]).float().log_softmax(-1)
            picked = lp.gather(-1, torch.tensor([tokens[j] for j in want])[:, None])[:, 0].tolist()
            tops = _top(lp, max(states[j].params.logprobs or 0 for j in want))
            for r, j in enumerate(want):
                k = states[j].params.logprobs or 0
                states[j].logprobs.append(TokenLogprob(tokens[j], picked[r], tops[r][:k]))  # type: ignore[union-attr]
        for s, token in zip(states, tokens, strict=True):
            s.pending = token
            if s.constraint is not None:
                s.constraint.advance(token)
            if s.seen is not None:
                s.seen[token] = True
            if s.counts is not None:
                s.counts[token] += 1

    @torch.inference_mode()
    def _prefill_rows(self, rows: list[tuple[int, list[int], int]]) -> Tensor:
        """Logits [len(rows), V] after each (slot, new ids, start) row's last new token, in passes of
        at most ``PREFILL_TOKENS`` padded tokens (which bounds a pass's activations)."""
        out, group = [], []
        with _setting(InferenceLinear, "same_in_any_batch", len(self.slots) > 1):  # (oneDNN stays on: many rows)
            for row in rows:
                width = max(len(r[1]) for r in [*group, row])
                if group and (len(group) + 1) * width > self.PREFILL_TOKENS:
                    out.append(self._prefill_pass(group))
                    group = []
                group.append(row)
            out.append(self._prefill_pass(group))
        return torch.cat(out).float().cpu()

    def _prefill_pass(self, rows: list[tuple[int, list[int], int]]) -> Tensor:
        """Several rows go right-padded through one forward pass: padding keys land past each row's
        own tokens, where the causal mask hides them until decoding overwrites them. Rows too uneven
        to pad (more than half padding) or too close to the context's end take a pass each."""
        width = max(len(ids) for _, ids, _ in rows)
        padded, real = width * len(rows), sum(len(ids) for _, ids, _ in rows)
        if len(rows) == 1 or padded > 2 * real + 64 or any(start + width > self.max_len for _, _, start in rows):
            return torch.cat([self.model(torch.tensor([ids], device=self.device),
                                         cache=self.cache.view([slot], [start], logits_at=-1,
                                                               dtype=self.prefill_dtype))[:, -1]
                              for slot, ids, start in rows])
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])  # the cache wants ascending slots
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(order):
            idx[r, : len(rows[i][1])] = torch.tensor(rows[i][1])
        last = torch.tensor([len(rows[i][1]) - 1 for i in order], device=self.device)
        view = self.cache.view([rows[i][0] for i in order], [rows[i][2] for i in order], logits_at=last,
                               dtype=self.prefill_dtype, lengths=[len(rows[i][1]) for i in order])
        logits = self.model(idx.to(self.device), cache=view)
        out = torch.empty_like(logits[:, 0])
        out[torch.tensor(order, device=self.device)] = logits[:, 0]
        return out

    @torch.inference_mode()
    def _decode_step(self, running: list[int], states: list[Slot]) -> Tensor:
        """Logits [len(running), V] of one token for each running slot (ascending), each at its own
        position. Only the running rows are computed: a contiguous run of slots is a view of the
        cache, scattered slots gather their rows (positions up to the longest)."""
        idx = torch.tensor([s.pending for s in states], device=self.device)[:, None]
        with slot_kernels(self.model, len(self.slots)):
            logits = self._decode(idx, cache=self.cache.view(running, [len(s.tokens) for s in states]))
        return logits[:, -1].float().cpu()


def slot_kernels(model: HavocModel, rows: int) -> AbstractContextManager[Any]:
    """The matmul backends of an engine of ``rows`` slots. A one-slot engine runs a half-precision
    row on ATen's matrix-vector kernel (1.2-2.5x oneDNN's on havoc-tiny/small, docs/LOG.md; ``mv``,
    ``mm`` and ``linear`` check one switch). Batching engines keep oneDNN (2-4x faster for several
    rows) for single rows too and round int8 activations row by row (``InferenceLinear._int8``):
    a seeded request must get the same tokens alone or batched."""
    w = model.embed.weight
    if rows > 1:
        return _setting(InferenceLinear, "same_in_any_batch", True)
    if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16):
        return _setting(torch.backends.mkldnn, "enabled", False)
    return nullcontext()


@contextmanager
def _setting(owner: Any, name: str, value: bool) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _top(lp: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely (id, logprob) of each row of lp [N, V]."""
    if k <= 0:
        return [[] for _ in range(lp.shape[0])]
    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n
