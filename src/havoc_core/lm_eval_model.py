"""HAVOC as an lm-evaluation-harness model: ``HavocLM`` scores requests with HAVOC's own model and engine.

It follows the conventions of lm-eval's ``hf`` model on a ``havoc export`` of the same checkpoint
(no BOS before a context, ``<|bos|>`` before an empty one, the same rolling windows and
truncation), so both give the same numbers; tests/test_lm_eval.py holds them to that.

Where it is faster: the choices of one question share their context, which is run through the
model once and its keys/values copied to one KV-cache row per choice; only the choices' own tokens
run after it. Requests go in batches of ``batch_size`` rows, longest first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer
from tqdm import tqdm

from havoc_core.engine import Engine
from havoc_core.errors import HavocError
from havoc_core.inference import load
from havoc_core.model import HavocModel
from havoc_core.sampling import SamplingParams
from havoc_core.tokenizer import CHAT_TEMPLATE, HavocTokenizer, render_chat

LOGITS_TOKENS = 4096  # positions whose logits one scoring pass may hold ([tokens, vocab] fp32)
Request = tuple[tuple[str, str], list[int], list[int]]  # (strings, context ids, continuation ids)


@register_model("havoc")
class HavocLM(TemplateLM):
    """``lm_eval --model havoc --model_args checkpoint=DIR[,batch_size=B,dtype=float32]``
    (via ``havoc-lm-eval``), or ``HavocLM(model, tokenizer)`` in-process (``havoc eval --tasks``)."""

    def __init__(self, model: HavocModel | None = None, tokenizer: HavocTokenizer | None = None, *,
                 checkpoint: str | None = None, batch_size: int | str = 16, dtype: str = "auto",
                 device: str | None = "auto", max_gen_toks: int = 256, max_batch_size: int | None = None) -> None:
        super().__init__()
        if model is None or tokenizer is None:
            if device is None or device.startswith("cuda") and not torch.cuda.is_available():
                device = "auto"  # lm-eval's command line says cuda by default; the hf model falls back too
            loaded = load(checkpoint, device=device, dtype=dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": our default
        self.max_length = model.config.max_seq_len
        self.max_gen_toks = max_gen_toks
        self._device = model.embed.weight.device
        # chat-template text carries role tokens as text: this copy parses them (HavocTokenizer never does)
        self._templated = Tokenizer.from_str(tokenizer.to_json())
        self._templated.encode_special_tokens = False
        self._cache = model.make_cache(self.batch_size, self.max_length)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return "havoc"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        ids, _ = render_chat(self.tok, chat_history, add_generation_prompt=add_generation_prompt)
        return self.tok.decode(ids, skip_special_tokens=False)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """No BOS is added (HAVOC's rendering decides it); a role token in the text is that token,
        as in the exported Hugging Face tokenizer."""
        return self._templated.encode(string, add_special_tokens=False).ids

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        rows = [self._fit(ctx, cont) for _, ctx, cont in requests]
        groups: dict[tuple[int, ...], list[int]] = {}  # context -> the requests that continue it
        for i, (ctx, _) in enumerate(rows):
            groups.setdefault(tuple(ctx), []).append(i)
        order = sorted(groups.items(), key=lambda g: -len(g[0]) - max(len(rows[i][1]) for i in g[1]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm, unit="req")
        for batch in self._batches(order, rows):
            for i, result in zip([i for _, members in batch for i in members], self._score(batch, rows), strict=True):
                out[i] = result
            bar.update(sum(len(m) for _, m in batch))
        bar.close()
        return [r for r in out if r is not None]

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate to the context window as lm-eval's ``hf`` does (the last max_length + 1 tokens)."""
        if not cont:
            raise HavocError("lm-eval request: empty continuation")
        if len(cont) > self.max_length:
            raise HavocError(f"lm-eval request: continuation of {len(cont)} tokens exceeds "
                             f"max_seq_len={self.max_length}")
        whole = (ctx + cont)[-(self.max_length + 1):]
        return whole[: len(whole) - len(cont)] or [self.prefix_token_id], cont

    def _batches(self, order: list[tuple[tuple[int, ...], list[int]]],
                 rows: list[tuple[list[int], list[int]]]) -> Iterator[list[tuple[tuple[int, ...], list[int]]]]:
        """Groups (split to at most batch_size members) packed into batches of at most batch_size rows
        and LOGITS_TOKENS continuation positions."""
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        n_rows = width = longest = 0
        for ctx, members in order:
            for k in range(0, len(members), self.batch_size):
                part = members[k: k + self.batch_size]
                w = max(len(rows[i][1]) for i in part)
                fits = (n_rows + len(part) <= self.batch_size and (n_rows + len(part)) * max(w, width) <= LOGITS_TOKENS
                        and max(longest, len(ctx)) + max(w, width) - 1 <= self.max_length)  # padded rows fit the cache
                if batch and not fits:
                    yield batch
                    batch, n_rows, width, longest = [], 0, 0, 0
                batch.append((ctx, part))
                n_rows, width, longest = n_rows + len(part), max(w, width), max(longest, len(ctx))
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, batch: list[tuple[tuple[int, ...], list[int]]],
               rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each context once into the first cache row of its group, its keys/values copied to the
        group's other rows, then every continuation (but its last token) from there; fp32 log-softmax."""
        dev, cache = self._device, self._cache
        firsts, row = [], 0
        for _, members in batch:
            firsts.append(row)
            row += len(members)
        ctx_len = [len(c) for c, _ in batch]
        idx = torch.full((len(batch), max(ctx_len)), self.tok.pad_id, dtype=torch.long)
        for g, (c, _) in enumerate(batch):
            idx[g, : len(c)] = torch.tensor(c)
        last = torch.tensor([n - 1 for n in ctx_len], device=dev)
        first_logits = self.model(idx.to(dev), cache=cache.view(firsts, [0] * len(batch), logits_at=last))[:, 0]
        for g, (_, members) in enumerate(batch):
            a, n = firsts[g], ctx_len[g]
            for layer in range(len(cache.k)):
                cache.k[layer][a + 1: a + len(members), :, :n] = cache.k[layer][a: a + 1, :, :n]
                cache.v[layer][a + 1: a + len(members), :, :n] = cache.v[layer][a: a + 1, :, :n]
        conts = [rows[i][1] for _, members in batch for i in members]
        starts = [n for n, (_, members) in zip(ctx_len, batch, strict=True) for _ in members]
        head = first_logits.repeat_interleave(torch.tensor([len(m) for _, m in batch], device=dev), dim=0)
        width = max(len(c) for c in conts) - 1
        if width > 0:
            idx = torch.full((len(conts), width), self.tok.pad_id, dtype=torch.long)
            for r, c in enumerate(conts):
                idx[r, : len(c) - 1] = torch.tensor(c[:-1])
            rest = self.model(idx.to(dev), cache=cache.view(list(range(len(conts))), starts))
            logits = torch.cat([head[:, None], rest], dim=1)
        else:
            logits = head[:, None]
        results = []
        for r, c in enumerate(conts):
            lp = logits[r, : len(c)].float().log_softmax(-1)
            target = torch.tensor(c, device=dev)
            results.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of whole texts: lm-eval's disjoint windows of max_length tokens."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((("", ""), list(ctx), list(cont)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logprob
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings, each group through one batched Engine."""
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        engine = Engine(self.model, self.tok, max_batch=self.batch_size)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, unit="req")
        for members in by_kwargs.values():
            params, budget = self._params(requests[members[0]].args[1])
            prompts = [self.tok_encode(requests[n].args[0])[-budget:] for n in members]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start: start + self.batch_size]
                for n, done in zip(chunk, engine.generate(prompts[start: start + len(chunk)], params), strict=True):
                    out[n] = _cut(self.tok.decode(done.ids), params.stop)  # as ``hf`` decodes: whole ids
                bar.update(len(chunk))
        bar.close()
        return [t if t is not None else "" for t in out]

    def _params(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, int]:
        """SamplingParams of lm-eval's gen_kwargs (``until``, ``max_gen_toks``, ``do_sample``,
        ``temperature``) and the prompt tokens that fit beside the reply (the ``hf`` model's rule).
        ``<|eos|>`` always stops the engine, as it ends ``hf``'s generation."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
        params = SamplingParams(max_new_tokens=max(1, min(max_gen, self.max_length - 1)), temperature=temperature,
                                top_p=float(kw.pop("top_p", 1.0)), stop=tuple(s for s in until if s))
        return params.validate(), max(1, self.max_length - params.max_new_tokens)


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string: the engine ends a reply at one, its ids include it."""
    for s in stops:
        text = text.split(s)[0]
    return text


def main() -> None:
    """``havoc-lm-eval``: lm-eval's own command line with ``--model havoc`` registered (lm-eval
    0.4 has no plugin entry point, so plain ``lm_eval`` cannot see models outside its tree)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
