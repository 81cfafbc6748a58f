"""Generation: a preallocated KV cache, prefill then decode, sampling, stop handling, UTF-8-safe
streaming and slot-based batching, for any ``HavocModel``.

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

``add`` prefills only the part of a prompt that the slot's cache does not already hold (a chat turn
prefills its new tokens only). ``Event.text`` is always whole UTF-8 characters and never runs into
a stop string. ``generate`` (many prompts -> completions, queueing beyond ``max_batch``) and
``stream`` (text deltas of one request) drive the engine themselves; a server calls
``add``/``step``/``remove`` from one thread.

Weights can be stored in bf16 or int8 (``prepare_model``); each phase picks its compute dtype:
the compute-bound prefill runs fp32 on CPUs without native bf16 (where bf16 matmuls are many
times slower), the memory-bound decode step reads each stored weight once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from havoc_core.attention import Attention
from havoc_core.errors import HavocError
from havoc_core.mlp import GatedMLP
from havoc_core.model import HavocModel

Quantize = Literal["int8"]
FinishReason = Literal["stop", "length", "abort"]


# --------------------------------------------------------------------------- sampling

@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off;
    ``seed`` makes a request reproducible whatever else is in the batch."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()  # besides the model's eos, which always stops
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens (stop strings still apply)

    def validate(self) -> SamplingParams:
        """HavocError naming the first value out of range; returns self for chaining."""
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", self.temperature, _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", self.top_p, _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty,
             _finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise HavocError(f"{name}: expected {expected}, found {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise HavocError(f"stop: expected non-empty strings, found {list(self.stop)!r}")
        return self


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 seen: Tensor | None = None) -> int:
    """One token id from logits [V]: repetition penalty (CTRL: divide positive logits, multiply
    negative ones, for every id in ``seen``), then greedy or temperature / top-k / top-p sampling."""
    return sample_tokens(logits[None], [params], [generator], [seen])[0]


def sample_tokens(logits: Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], seen: Sequence[Tensor | None]) -> list[int]:
    """``sample_token`` for every row of logits [N, V] at once, each row with its own params,
    generator and seen ids. Every row draws from its own generator (one uniform, sampling rows
    only) and every operation is row-wise, so a seeded request gets the same tokens in any batch."""
    logits = logits.float()
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
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        picked = (logits if len(greedy) == n else logits[greedy]).argmax(-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            tokens[i] = t
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    if not rows:
        return tokens
    ps = [params[i] for i in rows]
    x = logits if len(rows) == n else logits[rows]
    x = x / torch.tensor([p.temperature for p in ps], dtype=x.dtype)[:, None]
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
        keep = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True)  # the smallest prefix reaching top_p
        x = x.masked_fill(x < sorted_logits.gather(-1, keep - 1), -math.inf)  # ties with its last one stay
    # inverse CDF: one uniform draw (torch.multinomial draws V exponentials: ~7x slower per row at V=8192,
    # a large share of a batched decode step on CPU)
    cdf = x.softmax(-1).cumsum(-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]) * cdf[:, -1]
    picked = torch.searchsorted(cdf, u[:, None].to(cdf.dtype), right=True).clamp(max=vocab - 1)[:, 0].tolist()
    for i, t in zip(rows, picked, strict=True):
        tokens[i] = t
    return tokens


# --------------------------------------------------------------------------- detokenising

class TextStream:
    """Generated ids -> text deltas that are whole UTF-8 characters and never part of a stop string.

    Byte-level BPE splits characters across tokens: an incomplete character decodes to U+FFFD, so
    those are held back (and a byte sequence that never completes is dropped, not printed). A
    suffix that could still grow into a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # what has been emitted
        self.stopped = False  # a stop string was found; text ends before it

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids).replace("\ufffd", "")
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            full, final, self.stopped = full[: min(hits)], True, True
        if not final:
            full = full[: len(full) - _partial_stop(full, self.stop)]
        if len(full) <= len(self.text):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


# --------------------------------------------------------------------------- weights for inference

class InferenceLinear(nn.Module):
    """A frozen linear layer stored for decoding: its weight in bf16/fp16/fp32, or int8 with one
    scale per output row. It computes in the activations' dtype: a prefill upcasts (dequantises)
    the weight on the fly, a decode step reads the stored bytes once. On CPU an int8 decode step
    runs fbgemm's int8 kernel, which also rounds the step's activations to 8 bits (per tensor,
    on the fly): integer dot products are what make int8 faster than bf16 on a CPU without
    native bf16 (docs/LOG.md); the prefill stays weight-only. ``pack()`` adds a copy of a float
    weight in oneDNN's blocked layout for CPU matmuls (see its docstring)."""

    DECODE_ROWS = 16  # up to this many rows (a decode step of a batch) take the int8 kernel

    def __init__(self, weight: Tensor, bias: Tensor | None, quantize: Quantize | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or weight.dtype
        scale = None
        if quantize == "int8":
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            weight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        # buffers, so that model.to(device) moves them
        self.register_buffer("weight", weight.detach() if quantize else weight.detach().to(dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self._fbgemm: Any = None  # fbgemm's layout of an int8 weight, made on first CPU use
        self._onednn: Tensor | None = None  # oneDNN's layout of a float weight, made by pack()
        self._onednn_version: int | None = None  # the weight's version counter when it was packed

    def pack(self) -> None:
        """Keep a copy of the weight in oneDNN's blocked layout. A plain [out, in] weight is
        reordered inside every oneDNN matmul call: prepacked, an 8-row decode step of havoc-tiny
        and havoc-small runs 1.3-1.7x faster, fp32 single rows ~10% faster (docs/LOG.md). bf16
        single rows keep ATen's matrix-vector kernel, which streams a large weight faster. CPU
        only, fp32 weights and bf16 ones on CPUs with native bf16; costs a second copy of the weight.
        The copy is dropped by ``.to()`` and copies of the module, and made again if the weight
        is edited in place."""
        w = self.weight
        if self._onednn is not None or self.scale is not None or w.device.type != "cpu":
            return
        if not (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_has_native_bf16())):
            return
        try:
            self._onednn = torch.ops.mkldnn._reorder_linear_weight(w, 32)  # layout tuned for batches of ~32 rows
            self._onednn_version = _version(w)
        except (AttributeError, RuntimeError):  # a build without oneDNN
            self._onednn = None

    def _use_packed(self, x: Tensor) -> bool:
        if self._onednn is None or x.requires_grad or torch.compiler.is_compiling() or x.device.type != "cpu":
            return False  # (no autograd for the packed product; Inductor cannot lower it)
        if self._onednn_version is not None and _version(self.weight) != self._onednn_version:
            self._onednn = None  # edited in place since it was packed
            self.pack()
        return x.dtype == torch.float32 or x.numel() > x.shape[-1]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .cuda(), ...: the layouts are of the old tensors
        self._onednn, self._fbgemm = None, None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the opaque layouts out
        return {**super().__getstate__(), "_onednn": None, "_fbgemm": None}

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            if self.weight.dtype == x.dtype:  # the decode step: no conversion
                if self._use_packed(x):
                    return torch.ops.mkldnn._linear_pointwise(x, self._onednn, self.bias, "none", [], "")
                return F.linear(x, self.weight, self.bias)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.device.type == "cpu" and x.numel() <= self.DECODE_ROWS * x.shape[-1] and self._fbgemm_ready():
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), self._fbgemm, True)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _fbgemm_ready(self) -> bool:
        """Pack the int8 weight for the CPU kernel once; False where no quantized engine exists."""
        if self._fbgemm is None:
            try:
                zeros = torch.zeros(self.weight.shape[0], dtype=torch.long)
                with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels not (yet)
                    warnings.simplefilter("ignore", UserWarning)
                    q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zeros, 0)
                bias = None if self.bias is None else self.bias.float()
                self._fbgemm = torch.ops.quantized.linear_prepack(q, bias)
            except (RuntimeError, NotImplementedError):
                self._fbgemm = False
        return self._fbgemm is not False


class _CastRMSNorm(nn.RMSNorm):
    """RMSNorm that follows the activations' dtype (bf16 weights inside an fp32 prefill)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            weight = None if self.weight is None else self.weight.float()
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)
        h = x.float()  # half precision: normalise in fp32, scale in x's dtype (as HF Llama)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h if self.weight is None else h * self.weight.to(x.dtype)


def prepare_model(model: HavocModel, dtype: torch.dtype | None = None,
                  quantize: Quantize | None = None) -> HavocModel:
    """Convert ``model`` in place for inference: weights stored in ``dtype`` (e.g. bf16), the
    block and output matrices optionally int8. Its activations may then run in any dtype."""
    dtype = dtype or model.embed.weight.dtype
    if quantize not in (None, "int8"):
        raise HavocError(f"quantize: expected int8 or nothing, found {quantize!r}")
    model.eval().requires_grad_(False).to(dtype)
    for module in list(model.modules()):
        if isinstance(module, (Attention, GatedMLP)):
            module.fuse_projections()  # fewer ops per decode step: +8% tokens/s on havoc-tiny bf16
        if isinstance(module, nn.RMSNorm):
            module.__class__ = _CastRMSNorm
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) or (isinstance(child, InferenceLinear) and child.scale is None):
                setattr(module, name, InferenceLinear(child.weight, child.bias, quantize, dtype))
    if model.lm_head is None:  # tied: shares the embedding's storage, or an int8 copy
        model.lm_head = InferenceLinear(model.embed.weight, None, quantize, dtype)
    return model


def _version(t: Tensor) -> int | None:
    """A tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def pack_for_cpu(model: HavocModel) -> None:
    """Prepack a prepared model's float matrices for oneDNN (``InferenceLinear.pack``)."""
    for module in model.modules():
        if isinstance(module, InferenceLinear):
            module.pack()


def is_packed(model: HavocModel) -> bool:
    """Whether ``pack_for_cpu`` left a packed copy of any matrix (it doubles their memory)."""
    return any(isinstance(m, InferenceLinear) and m._onednn is not None for m in model.modules())


def default_prefill_dtype(model: HavocModel) -> torch.dtype:
    """The prefill is compute-bound: the weights' own dtype on accelerators and on CPUs with native
    bf16 (AVX512-BF16/AMX), fp32 on other CPUs, where bf16 matmuls are many times slower than fp32."""
    w = model.embed.weight
    if w.device.type != "cpu" or w.dtype == torch.float32:
        return w.dtype
    return torch.bfloat16 if w.dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_for_inference(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                       quantize: Quantize | None = None) -> tuple[HavocModel, Any]:
    """Model and tokenizer of a checkpoint (or of a run's newest checkpoint), checked against each other."""
    from havoc_core.checkpoint import find_checkpoint, load_model
    from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer

    ckpt = find_checkpoint(path)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise HavocError(f"{ckpt}: no {TOKENIZER_FILE} in this checkpoint (chat needs one; store it with "
                         f"`havoc init --tokenizer` or train with `havoc pretrain` / `havoc sft`)")
    tokenizer = HavocTokenizer.load(ckpt)
    model = load_model(ckpt, device=device)
    tokenizer.check_compatible(model.config)
    prepare_model(model, dtype, quantize)
    return model, tokenizer


# --------------------------------------------------------------------------- the engine

@dataclass
class Event:
    """One step of one request: the token just produced (the stop token too) and the text it adds."""

    slot: int
    token: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class Completion:
    prompt_tokens: int
    ids: list[int]  # generated ids, without the stop token
    text: str
    finish_reason: FinishReason | None


@dataclass
class _Slot:
    tokens: list[int]  # ids whose keys/values sit in the cache at positions 0 .. len-1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_len: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int = 0  # sampled, not yet in the cache
    reported: bool = True
    active: bool = False
    finish_reason: FinishReason | None = None
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    seen: Tensor | None = None
    cached: int = 0  # prompt tokens the cache already held when it was added (not prefilled)


class Engine:
    """Slot-based batch decoder over one preallocated KV cache (see the module docstring)."""

    PREFILL_TOKENS = 4096  # padded prompt tokens per batched prefill pass
    # A batching engine prepacks its matrices for oneDNN (InferenceLinear.pack: a second copy of the
    # weights). A single stream gains only in fp32 (~10-20%), so there it packs small models only:
    # bf16 chat, and fp32 chat of a big model, keep one copy of the weights.
    PACK_FP32_SINGLE_BELOW = 50_000_000

    def __init__(self, model: HavocModel, tokenizer: Any = None, *, max_batch: int = 1,
                 prefill_dtype: torch.dtype | None = None, compile: bool = False, pack: bool | None = None) -> None:
        """``pack``: prepack the matrices for oneDNN on CPU (default: when batching, see above)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_len = cfg.max_seq_len
        self.device = model.embed.weight.device
        self.cache = model.make_cache(max_batch, self.max_len)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.prefill_dtype = prefill_dtype or default_prefill_dtype(model)
        self.stop_ids = {cfg.eos_token_id}
        self._decode = torch.compile(model, dynamic=True) if compile else model
        if pack is None:
            fp32 = model.embed.weight.dtype == torch.float32
            pack = max_batch > 1 or (fp32 and model.num_parameters() < self.PACK_FP32_SINGLE_BELOW)
        if pack and not compile:
            pack_for_cpu(model)
        # oneDNN's bf16 matrix-vector product runs at half the memory bandwidth of ATen's on CPUs
        # without native bf16 (docs/LOG.md); for several rows oneDNN is the faster one
        self._single_row_no_onednn = self.device.type == "cpu" and model.embed.weight.dtype != torch.float32

    # ------------------------------------------------------------------ requests

    def add(self, prompt: Sequence[int] | str, params: SamplingParams | None = None, *,
            slot: int | None = None) -> int:
        """Prefill ``prompt`` into ``slot`` (default: the first free one), reusing whatever prefix of
        it the slot's cache already holds, and sample the first token (reported by the next step)."""
        return self.add_batch([(prompt, params, slot)])[0]

    def add_batch(self, requests: Sequence[tuple[Sequence[int] | str, SamplingParams | None, int | None]]) -> list[int]:
        """``add`` for several (prompt, params, slot) requests in one prefill forward pass: requests
        that arrive together cost about one prefill instead of one each (8 prompts of 20 tokens on
        havoc-tiny: 17 ms vs 8 x 5 ms). Everything is checked before anything changes."""
        rows: list[tuple[int, list[int], int, SamplingParams]] = []  # slot, ids, cached prefix, params
        taken: set[int] = set()
        for prompt, params, slot in requests:
            params = (params or SamplingParams()).validate()
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
            self.slots[slot] = _Slot(tokens=ids[:keep], params=params, prompt_len=len(ids), reported=False,
                                     active=True, cached=keep)
            states.append(self.slots[slot])
        logits = self._prefill_rows([(slot, ids[keep:], keep) for slot, ids, keep, _ in rows])
        for state, (_, ids, _keep, params) in zip(states, rows, strict=True):
            state.tokens = ids
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            state.generator = torch.Generator().manual_seed(seed)
            if params.repetition_penalty != 1.0:
                state.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
                state.seen[ids] = True
            if self.tokenizer is not None:
                state.stream = TextStream(self.tokenizer, params.stop)
        self._sample_rows(states, logits)
        return [slot for slot, *_ in rows]

    def step(self) -> list[Event]:
        """Advance every active slot by one token: fresh slots report the token their prefill
        sampled, running slots decode one (all of them in one batched forward pass)."""
        active = [i for i, s in enumerate(self.slots) if s is not None and s.active]
        running = [i for i in active if self.slots[i].reported]  # type: ignore[union-attr]
        events = []
        if running:
            states = [self.slots[i] for i in running]
            logits = self._decode_step(running, states)  # type: ignore[arg-type]
            for s in states:
                s.tokens.append(s.pending)  # type: ignore[union-attr]
            self._sample_rows(states, logits)  # type: ignore[arg-type]
            for i, s in zip(running, states, strict=True):
                events.append(self._report(i, s))  # type: ignore[arg-type]
        for i in active:
            s = self.slots[i]
            assert s is not None
            if not s.reported:
                s.reported = True
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
            s.active, s.finish_reason = False, "abort"

    def remove(self, slot: int) -> None:
        self.slots[slot] = None

    def result(self, slot: int) -> Completion:
        s = self.slots[slot]
        if s is None:
            raise HavocError(f"slot {slot}: empty")
        text = s.stream.text if s.stream is not None else ""
        return Completion(s.prompt_len, list(s.generated), text, s.finish_reason)

    # ------------------------------------------------------------------ drivers

    def stream(self, prompt: Sequence[int] | str, params: SamplingParams | None = None, *,
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

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Complete every prompt, ``max_batch`` at a time; a finished request's slot goes to the next prompt."""
        results: list[Completion | None] = [None] * len(prompts)
        owner: dict[int, int] = {}
        queue = list(range(len(prompts)))
        while queue or owner:
            free = sum(s is None for s in self.slots)
            if queue and free:  # every prompt that fits joins in one batched prefill
                batch, queue = queue[:free], queue[free:]
                for slot, j in zip(self.add_batch([(prompts[j], params, None) for j in batch]), batch, strict=True):
                    owner[slot] = j
            self.step()
            for slot in [i for i in owner if not self._is_active(i)]:
                results[owner.pop(slot)] = self.result(slot)
                self.remove(slot)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ internals

    def _is_active(self, slot: int) -> bool:
        s = self.slots[slot]
        return s is not None and s.active

    def _report(self, i: int, s: _Slot) -> Event:
        token = s.pending
        stream = s.stream
        if not s.params.ignore_eos and (token in self.stop_ids or token in s.params.stop_ids):
            return self._end(i, s, token, stream.finish() if stream else "", "stop")
        s.generated.append(token)
        text = stream.push(token) if stream else ""
        if stream is not None and stream.stopped:
            return self._end(i, s, token, text, "stop")
        if len(s.generated) >= s.params.max_new_tokens or len(s.tokens) + 1 >= self.max_len:
            return self._end(i, s, token, text + (stream.finish() if stream else ""), "length")
        return Event(i, token, text)

    def _end(self, i: int, s: _Slot, token: int, text: str, reason: FinishReason) -> Event:
        s.active, s.finish_reason = False, reason
        return Event(i, token, text, reason)

    def _sample_rows(self, states: list[_Slot], logits: Tensor) -> None:
        """Sample every state's next (pending) token from its row of logits [N, V], in one batch."""
        if torch.isnan(logits.sum()):  # a sum is ~5x cheaper than isnan(logits).any() at [8, 8192]
            raise HavocError("the model produced NaN logits: its weights are broken (diverged training or a bad file)")
        tokens = sample_tokens(logits, [s.params for s in states], [s.generator for s in states],
                               [s.seen for s in states])
        for s, token in zip(states, tokens, strict=True):
            s.pending = token
            if s.seen is not None:
                s.seen[token] = True

    @torch.inference_mode()
    def _prefill_rows(self, rows: list[tuple[int, list[int], int]]) -> Tensor:
        """Logits [len(rows), V] after each (slot, new ids, start) row's last new token, in passes of
        at most ``PREFILL_TOKENS`` padded tokens (which bounds a pass's activations)."""
        out, group = [], []
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
            return torch.cat([self._forward_rows(self.model, torch.tensor([ids], device=self.device), [start], [slot],
                                                 last_only=True, compute_dtype=self.prefill_dtype)[:, -1]
                              for slot, ids, start in rows])
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])  # the cache wants ascending slots
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(order):
            idx[r, : len(rows[i][1])] = torch.tensor(rows[i][1])
        last = torch.tensor([len(rows[i][1]) - 1 for i in order], device=self.device)
        logits = self._forward_rows(self.model, idx.to(self.device), [rows[i][2] for i in order],
                                    [rows[i][0] for i in order], logits_at=last, compute_dtype=self.prefill_dtype)
        out = torch.empty_like(logits[:, 0])
        out[torch.tensor(order, device=self.device)] = logits[:, 0]
        return out

    @torch.inference_mode()
    def _decode_step(self, running: list[int], states: list[_Slot]) -> Tensor:
        """Logits [len(running), V] of one token for each running slot (ascending), each at its own
        position. Only the running rows are computed: a contiguous run of slots is a view of the
        cache, scattered slots gather their rows (positions up to the longest)."""
        pos = [len(s.tokens) for s in states]
        idx = torch.tensor([s.pending for s in states], device=self.device)[:, None]
        with _onednn(not (self._single_row_no_onednn and len(running) == 1)):
            logits = self._forward_rows(self._decode, idx, pos, running)
        return logits[:, -1].float().cpu()

    def _forward_rows(self, model: Any, idx: Tensor, pos: list[int], running: list[int], **kw: Any) -> Tensor:
        """``model`` on idx [B, T]: row b continues slot ``running[b]`` (ascending) at position ``pos[b]``."""
        lo, n, T = running[0], len(running), idx.shape[1]
        if n == 1:
            cache = [c.view(slice(lo, lo + 1), pos[0] + T) for c in self.cache]
            return model(idx, cache=cache, start=pos[0], **kw)
        length = max(pos) + T
        start = torch.tensor(pos, device=self.device)
        limit = start[:, None] + torch.arange(T, device=self.device)  # the last key each query may see
        mask = (torch.arange(length, device=self.device) <= limit[..., None])[:, None]  # [B, 1, T, S]
        if running[-1] - lo + 1 == n:  # contiguous slots
            cache = [c.view(slice(lo, lo + n), length) for c in self.cache]
        else:
            rows = torch.tensor(running, device=self.device)
            cache = [_RowsCache(c, rows, length) for c in self.cache]  # type: ignore[misc]
        return model(idx, cache=cache, start=start, mask=mask, **kw)


class _RowsCache:
    """Some rows of a KV cache (a [B] index), positions [0, length): a decode step writes each row's
    new keys/values at its own position in place and attends to a gathered copy of the rows."""

    def __init__(self, cache: Any, rows: Tensor, length: int) -> None:
        self.cache, self.rows, self.length = cache, rows, length

    def update(self, start: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.write_rows(self.rows, start, k, v)
        ck, cv = self.cache.k, self.cache.v
        return (ck[:, :, :self.length].index_select(0, self.rows).to(k.dtype),
                cv[:, :, :self.length].index_select(0, self.rows).to(v.dtype))


@contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n
