"""Chat: a multi-turn session over the generation engine, and the terminal loop (``havoc chat``,
``python chat_havoc.py``), plus ``havoc generate`` (raw completion) and ``havoc smoke``.

The session keeps its KV cache across turns: each turn prefills only its new tokens. History uses
the shared chat format (``tokenizer.render_chat``); when it outgrows the context the oldest turns
are dropped (never the system prompt) down to half the context, so the cache is rebuilt only once
in a while rather than on every turn.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from havoc_core import quant_kernel
from havoc_core.config import format_params
from havoc_core.engine import Engine
from havoc_core.errors import HavocError
from havoc_core.inference import Loaded, load
from havoc_core.precision import Quantize
from havoc_core.sampling import SamplingParams
from havoc_core.tokenizer import render_chat

# no_repeat_ngram_size 8: a reply never says the same 8 tokens twice. A small model's greedy (and often
# sampled) replies fall into loops; an 8-token span is longer than any phrase prose repeats on purpose,
# so only loops are cut, and the cost is a set lookup per token (docs/LOG.md 2026-12-03)
CHAT_DEFAULTS = SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                               no_repeat_ngram_size=8)
GENERATE_DEFAULTS = SamplingParams()
SMOKE_DEFAULTS = replace(CHAT_DEFAULTS, temperature=0.0, max_new_tokens=48)  # greedy: the same replies every run
SMOKE_PROMPTS = ["Hello! Who are you?", "What does the len function do?", "Explain the with statement."]
# what a model may print to a terminal: no escape sequences or other control characters
PRINTABLE = {c: None for c in [*range(0x20), 0x7F] if chr(c) not in "\n\t"}
HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone shows it, /system - removes it)
  /temp X        sampling temperature (0 = greedy)
  /top_p X       nucleus sampling threshold in (0, 1]
  /max N         longest reply in tokens
  /quit          leave (or Ctrl-D); Ctrl-C stops a reply
  //text         send a message that starts with /"""


# --------------------------------------------------------------------------- the session

class ChatSession:
    """One conversation: history as messages plus their token ids, one engine slot whose cache
    holds the conversation so far. ``reply(text)`` prefills the new tokens and returns the
    stream of text deltas; the reply is recorded when the stream ends (or is stopped)."""

    def __init__(self, model: Any, tokenizer: Any, *, system: str | None = None,
                 params: SamplingParams | None = None, compile: bool = False) -> None:
        self.tok = tokenizer
        self.engine = Engine(model, tokenizer, compile=compile)
        self.max_len = self.engine.max_len
        self.params = (params or CHAT_DEFAULTS).validate()
        self.stop_ids = tokenizer.turn_stop_ids()  # a reply ends at <|eos|> or where another turn would start
        self.system: str | None = None
        self.system_ids: list[int] = []
        self.turns: list[tuple[dict[str, str], list[int]]] = []  # (message, its ids), system excluded
        self.notices: list[str] = []  # what the last reply() had to do to fit the context
        self.last_prefill = 0  # tokens the last reply() ran through the model before its first token
        self._dropped_before = False
        self._open = False
        if system:
            self.set_system(system)

    # ------------------------------------------------------------------ history
    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m for m, _ in self.turns]

    def _message_ids(self, role: str, content: str) -> list[int]:
        return render_chat(self.tok, [{"role": role, "content": content}])[0][1:]  # without <|bos|>

    def prompt_ids(self) -> list[int]:
        """The conversation plus the generation prompt: ``render_chat(messages, True)``, except that
        replies keep the exact ids the model produced (so the cache matches them)."""
        ids = [self.tok.bos_id, *self.system_ids]
        for _, message_ids in self.turns:
            ids += message_ids
        return ids + [self.tok.role_id("assistant")]

    def reset(self) -> None:
        self._close()
        self.turns, self._dropped_before = [], False

    def set_system(self, text: str | None) -> None:
        """Set (or with None/"" remove) the system prompt; it must leave half the context free."""
        ids = self._message_ids("system", text) if text else []
        if len(ids) > self.max_len // 2:
            raise HavocError(f"system prompt: {len(ids)} tokens, expected at most {self.max_len // 2} "
                             f"(half the context of {self.max_len})")
        self._close()
        self.system, self.system_ids = text or None, ids

    def set_params(self, **changes: Any) -> None:
        self.params = replace(self.params, **changes).validate()

    def _reserve(self) -> int:
        return min(self.params.max_new_tokens, self.max_len // 4)

    def _fit(self, user_ids: list[int], text: str) -> tuple[dict[str, str], list[int]]:
        """Drop the oldest turns and, if it alone is too long, cut the message to fit the context."""
        self.notices = []
        budget = self.max_len - self._reserve()
        head = 1 + len(self.system_ids) + 1  # <|bos|> + system ... + <|assistant|>
        room = budget - head - 2  # the message's own <|user|> and <|eos|>
        body = user_ids[1:-1]
        if len(body) > room:
            body = body[len(body) - room:]
            text = self.tok.decode(body)
            self.notices.append(f"your message is {len(user_ids) - 2} tokens; only its last {room} fit in the "
                                f"context of {self.max_len}")
            user_ids = [user_ids[0], *body, user_ids[-1]]
        used = head + sum(len(ids) for _, ids in self.turns) + len(user_ids)
        if used > budget:
            target = min(budget, self.max_len // 2)
            while self.turns and used > target:
                _, ids = self.turns.pop(0)
                used -= len(ids)
            while self.turns and self.turns[0][0]["role"] != "user":  # history starts with a user turn
                used -= len(self.turns.pop(0)[1])
            if not self._dropped_before:
                self.notices.append("the conversation no longer fits the context: dropping the oldest turns "
                                    "(the system prompt stays)")
                self._dropped_before = True
        return {"role": "user", "content": text}, user_ids

    # ------------------------------------------------------------------ replying
    def reply(self, text: str) -> Generator[str, None, None]:
        """Prefill the new turn now (Ctrl-C here leaves the history as it was) and return its
        stream of text deltas."""
        if not text.strip():
            raise HavocError("message: empty (type something, or /help)")
        self._close()
        message, user_ids = self._fit(self._message_ids("user", text), text)
        saved = self.turns
        self.turns = [*saved, (message, user_ids)]
        try:
            self.engine.add(self.prompt_ids(), replace(self.params, stop_ids=self.stop_ids), slot=0)
        except BaseException:
            self.turns = saved
            raise
        slot = self.engine.slots[0]
        assert slot is not None
        self.last_prefill = len(slot.tokens) - slot.cached
        self._open = True
        return self._stream()

    def _stream(self) -> Generator[str, None, None]:
        try:
            while self.engine.active():
                for event in self.engine.step():
                    if event.text:
                        yield event.text
        finally:
            self._close()

    def _close(self) -> None:
        """Record the reply in progress (whole or stopped) as the assistant's turn."""
        if not self._open:
            return
        self._open = False
        self.engine.finish(0)
        done = self.engine.result(0)
        ids = [self.tok.role_id("assistant"), *done.ids, self.tok.eos_id]
        self.turns.append(({"role": "assistant", "content": done.text}, ids))

    def last_reply(self) -> Any:
        return self.engine.result(0)

    def ask(self, text: str) -> str:
        return "".join(self.reply(text))


# --------------------------------------------------------------------------- the terminal loop

def _utf8_console() -> None:
    """Never crash on odd bytes: undecodable input becomes U+FFFD, unprintable output '?'."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _line_editing() -> None:
    try:
        import readline  # noqa: F401  (input() gains line editing and in-session history)
    except ImportError:  # Windows without pyreadline: plain input()
        pass


def _banner(loaded: Loaded, out: TextIO) -> None:
    print("=== HAVOC CHAT INTERFACE LOADED ===", file=out)
    print(f"Model parameters: {format_params(loaded.n_params)}", file=out)
    print("Model loaded successfully!", file=out, flush=True)


def _command(session: ChatSession, line: str) -> bool:
    """Run one /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    setters = {"/temp": ("temperature", float), "/top_p": ("top_p", float), "/max": ("max_new_tokens", int)}
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        session.reset()
        print("(conversation cleared)")
    elif name == "/system":
        if not arg:
            print(f"system prompt: {session.system!r}" if session.system else "(no system prompt)")
        else:
            session.set_system(None if arg == "-" else arg)
            print("(system prompt removed)" if arg == "-" else "(system prompt set)")
    elif name in setters:
        field, kind = setters[name]
        try:
            value = kind(arg)
        except ValueError:
            raise HavocError(f"{name}: expected {'an integer' if kind is int else 'a number'}, found {arg!r}") from None
        session.set_params(**{field: value})
        print(f"({field} = {value})")
    else:
        print(f"unknown command {name} (try /help)")
    return True


def _say(session: ChatSession, text: str, out: TextIO) -> None:
    """Stream one reply; Ctrl-C stops it and keeps what was said."""
    stream: Generator[str, None, None] | None = None
    try:
        stream = session.reply(text)
        for notice in session.notices:
            print(f"[{notice}]", file=out)
        print("HAVOC: ", end="", file=out, flush=True)
        for delta in stream:
            print(delta.translate(PRINTABLE), end="", file=out, flush=True)
        print(file=out)
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        session._close()
        print(" [stopped]", file=out, flush=True)


def _compile_now(session: ChatSession, out: TextIO) -> None:
    """Compile before the first message, not inside the first reply: a throwaway reply's first two
    decode steps compile (for its shapes, then with the position symbolic: ``compile_decode``)."""
    print("compiling the decode step (20-40 s the first time, a few s once cached) ...", file=out, flush=True)
    start = time.perf_counter()
    bos = session.engine.model.config.bos_token_id
    session.engine.generate([[bos]], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    print(f"compiled in {time.perf_counter() - start:.0f} s", file=out, flush=True)


def run_chat(checkpoint: str | Path | None = None, *, system: str | None = None,
             params: SamplingParams | None = None, device: str = "auto", dtype: str = "auto",
             quantize: Quantize | None = None, compile: bool = False, prompt: str | None = None) -> int:
    """The chat REPL. With ``prompt``: one reply on stdout (the banner goes to stderr) and exit."""
    _utf8_console()
    loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
    _banner(loaded, sys.stderr if prompt is not None else sys.stdout)
    if (compile and loaded.plan.quantize == "int8" and loaded.plan.device == "cpu"
            and not isinstance(quant_kernel.load(), quant_kernel.Kernel)):
        # fbgemm's packed int8 weight (where HAVOC's kernel is not built) is opaque to torch.compile:
        # every product is a graph break, and that step measured 1.6x slower than eager (docs/LOG.md)
        print("note: --compile ignored for int8 weights on this CPU (fbgemm's products cannot be compiled; "
              "eager is faster)", file=sys.stderr)
        compile = False
    session = ChatSession(loaded.model, loaded.tokenizer, system=system, params=params, compile=compile)
    if compile:
        _compile_now(session, sys.stderr if prompt is not None else sys.stdout)
    if prompt is not None:
        if not prompt.strip():
            raise HavocError("--prompt: empty message")
        _say(session, prompt, sys.stdout)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _line_editing()
    while True:
        try:
            line = input("You: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)")
            continue
        if not interactive:
            print(line)  # piped: echo, so the transcript reads like a conversation
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not _command(session, line):
                    return 0
                continue
            _say(session, line[1:] if line.startswith("//") else line, sys.stdout)
        except HavocError as e:
            print(f"error: {e}")


def answer_questions(checkpoint: str | Path | None, questions: Sequence[str],
                     params: SamplingParams | None = None, **load_args: Any) -> list[str]:
    """One fresh conversation per question; greedy by default, so the answers are reproducible."""
    loaded = load(checkpoint, **load_args)
    session = ChatSession(loaded.model, loaded.tokenizer,
                          params=params or replace(CHAT_DEFAULTS, temperature=0.0, max_new_tokens=128))
    answers = []
    for q in questions:
        session.reset()
        answers.append(session.ask(q))
    return answers


# --------------------------------------------------------------------------- generate and smoke

def run_generate(checkpoint: str | Path, prompt: str, params: SamplingParams | None = None, *,
                 device: str = "auto", dtype: str = "auto", quantize: Quantize | None = None) -> int:
    """Raw completion of ``prompt`` (as a document: ``<|bos|>`` + text), streamed to stdout."""
    _utf8_console()
    params = (params or SamplingParams()).validate()
    loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok)
    t0 = time.perf_counter()
    for delta in engine.stream([tok.bos_id, *tok.encode(prompt)], params, slot=0):
        print(delta.translate(PRINTABLE), end="", flush=True)
    print()
    done, dt = engine.result(0), time.perf_counter() - t0
    print(f"[{len(done.ids)} tokens in {dt:.2f} s, {len(done.ids) / dt:.1f} tokens/s, "
          f"finish: {done.finish_reason}]", file=sys.stderr)
    return 0


def run_smoke(checkpoint: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
              quantize: Quantize | None = None, params: SamplingParams | None = None) -> int:
    """Load a checkpoint, answer three fixed prompts (greedy unless ``params``), print replies and tokens/s.
    Exit status 0 only if loading and every generation worked."""
    _utf8_console()
    loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
    print(f"loaded {loaded.path} ({format_params(loaded.n_params)} parameters) in {loaded.seconds:.1f} s; "
          f"{loaded.plan.describe()}")
    session = ChatSession(loaded.model, loaded.tokenizer, params=params or SMOKE_DEFAULTS)
    failed = 0
    for q in SMOKE_PROMPTS:
        session.reset()
        t0 = time.perf_counter()
        try:
            answer = session.ask(q)
        except Exception as e:  # a broken model must fail the smoke test with a message, not hang
            print(f"You: {q}\nerror: generation failed: {e.__class__.__name__}: {e}\n")
            failed += 1
            continue
        dt = time.perf_counter() - t0
        n = len(session.last_reply().ids)
        print(f"You: {q}\nHAVOC: {answer.translate(PRINTABLE)}\n"
              f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s]\n", flush=True)
    print("smoke test " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0
