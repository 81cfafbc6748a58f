"""Chat: the session (cache kept across turns, context fitting) in-process, and `havoc chat` driven
in a real pseudo-terminal (pexpect), piped, through `python chat_havoc.py` and with bad input.

Checkpoints are real: a BPE tokenizer trained on pydoc topics and a randomly initialised tiny model."""

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
import torch

from havoc_core import HavocError
from havoc_core.chat import ChatSession, answer_questions
from havoc_core.checkpoint import save_model
from havoc_core.cli import main
from havoc_core.precision import kernel_isa
from havoc_core.sampling import SamplingParams
from havoc_core.tokenizer import HavocTokenizer, render_chat

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "havoc_core.cli"]
BANNER = ["=== HAVOC CHAT INTERFACE LOADED ===", "Model parameters: 0.00B", "Model loaded successfully!"]
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12)
LONG_PROMPT = "Tell me everything about the import statement"


@pytest.fixture(scope="module")
def short_ckpt(tok, tiny_model, tmp_path_factory) -> Path:
    """A 128-token context: a few turns overflow it."""
    model = tiny_model(max_seq_len=128)
    return save_model(tmp_path_factory.mktemp("short") / "checkpoint_step_1", model, tokenizer=tok)


@pytest.fixture(scope="module")
def long_ckpt(tok, tiny_model, tmp_path_factory) -> Path:
    """A 4096-token context, and a prompt whose greedy reply is long enough to interrupt (the
    special tokens' tied embeddings are scaled down, so their logits stay near 0: no early stop)."""
    model = tiny_model(max_seq_len=4096)
    with torch.no_grad():
        model.embed.weight[:6] *= 0.01
    session = ChatSession(model, tok, params=SamplingParams(temperature=0.0, max_new_tokens=1500))
    session.ask(LONG_PROMPT)
    assert len(session.last_reply().ids) == 1500, "the fixture model must not stop early for the Ctrl-C test"
    return save_model(tmp_path_factory.mktemp("long") / "checkpoint_step_1", model, tokenizer=tok)


# --------------------------------------------------------------------------- the session, in-process

def test_prompt_is_the_shared_chat_format(tok, tiny_model):
    session = ChatSession(tiny_model(max_seq_len=128), tok, system="Be brief.", params=GREEDY)
    session.turns.append(({"role": "user", "content": "héllo 😀"}, session._message_ids("user", "héllo 😀")))
    assert session.prompt_ids() == render_chat(tok, session.messages, add_generation_prompt=True)[0]


def test_each_turn_prefills_only_its_new_tokens(tok, tiny_model):
    """The KV cache is kept across turns: time to first token does not grow with the conversation."""
    session = ChatSession(tiny_model(max_seq_len=4096), tok, system="You answer questions about Python.", params=GREEDY)
    prefills = []
    for i in range(12):
        question = f"Question number {i}: what does the with statement do?"
        session.ask(question)
        prefills.append(session.last_prefill)
        user_tokens = len(tok.encode(question))
        # new tokens: the last reply token (sampled, never fed) + <|eos|>, <|user|> question <|eos|>, <|assistant|>
        assert session.last_prefill <= user_tokens + 5 + (len(session.system_ids) + 1 if i == 0 else 0)
    assert max(prefills[1:]) <= min(prefills[1:]) + 10  # flat, while the history grew by ~25 tokens a turn
    cached = session.engine.slots[0].tokens
    assert len(cached) > 250 and cached == session.prompt_ids()[: len(cached)]


def test_overflow_drops_oldest_turns_keeps_system_and_says_so_once(tok, tiny_model):
    session = ChatSession(tiny_model(max_seq_len=128), tok, system="Be brief.", params=GREEDY)
    notices = []
    for i in range(60):
        session.ask(f"turn {i} 中文 😀")
        notices += session.notices
        done = session.last_reply()
        assert done.prompt_tokens <= 128 - GREEDY.max_new_tokens and done.prompt_tokens + len(done.ids) <= 128
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.turns[0][0]["role"] == "user"
    assert len(notices) == 1 and "dropping the oldest turns" in notices[0]
    assert session.turns[-2][0]["content"] == "turn 59 中文 😀"


def test_a_message_longer_than_the_context_is_cut(tok, tiny_model):
    session = ChatSession(tiny_model(max_seq_len=128), tok, params=GREEDY)
    reply = session.ask("word " * 5000)
    assert isinstance(reply, str) and "only its last" in session.notices[0]
    assert session.last_reply().prompt_tokens <= 128 - GREEDY.max_new_tokens


def test_bad_values_leave_the_session_usable(tok, tiny_model):
    session = ChatSession(tiny_model(max_seq_len=128), tok, params=GREEDY)
    for change in [{"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}]:
        with pytest.raises(HavocError):
            session.set_params(**change)
    with pytest.raises(HavocError, match="empty"):
        session.reply("   ")
    with pytest.raises(HavocError, match="system prompt"):
        session.set_system("long " * 500)
    assert session.params == GREEDY and session.ask("still here?") is not None


def test_answer_questions_is_reproducible(short_ckpt):
    first = answer_questions(short_ckpt, ["What is len?", "Explain with."])
    assert len(first) == 2 and all(isinstance(a, str) for a in first)
    assert answer_questions(short_ckpt, ["What is len?", "Explain with."]) == first


# --------------------------------------------------------------------------- a real terminal

def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(CLI[0], [*CLI[1:], "chat", *args], encoding="utf-8", timeout=60,
                         dimensions=(50, 200), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TERM": "xterm"})


def reply_of(child: pexpect.spawn) -> str:
    child.expect("HAVOC: ")
    child.expect("\r\nYou: ")
    return child.before


def test_pty_chat_session(long_ckpt):
    child = spawn(str(long_ckpt), "--temperature", "0", "--max-new-tokens", "16")
    for line in BANNER:
        child.expect_exact(line)
    child.expect("You: ")
    for q in ["Hello!", "What does len do?", "And the with statement?"]:
        child.sendline(q)
        assert reply_of(child).strip() != ""
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect("You: ")
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect("You: ")
    child.sendline("こんにちは 中文 😀👍🏽 ünïcödé")
    assert "\ufffd" not in reply_of(child)
    child.sendline("/max 1500")
    child.expect("You: ")
    child.sendline(LONG_PROMPT)
    child.expect("HAVOC: ")
    child.expect(r"\S\S\S")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect("You: ")
    child.sendline("/max 8")
    child.expect("You: ")
    child.sendline("are you still there?")
    reply_of(child)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def paste_while_reading(child: pexpect.spawn, text: str, until: str, timeout: float = 120.0) -> str:
    """Send ``text`` in 1 kB chunks while a thread drains the child's output (the echo of a 50 kB
    paste fills the pty's buffers: a writer that never reads blocks in ``os.write`` for ever), then
    wait, bounded, until the drained output matches ``until``; returns that output."""
    got: list[bytes] = []
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            if select.select([child.child_fd], [], [], 0.05)[0]:
                try:
                    got.append(os.read(child.child_fd, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        data = text.encode()
        for i in range(0, len(data), 1024):
            os.write(child.child_fd, data[i : i + 1024])
        deadline = time.monotonic() + timeout
        while not re.search(until, out := b"".join(got).decode(errors="replace")):
            assert time.monotonic() < deadline and reader.is_alive(), f"no {until!r} after the paste: {out[-300:]!r}"
            time.sleep(0.05)
    finally:
        stop.set()
        reader.join(timeout=5)
    return out


def test_pty_sixty_turns_overflow_and_a_50kb_paste(short_ckpt):
    child = spawn(str(short_ckpt.parent), "--max-new-tokens", "8")  # a run dir: its newest checkpoint
    child.expect("You: ")
    transcript = ""
    for i in range(60):
        child.sendline(f"turn {i}: tell me more")
        child.expect("\r\nYou: ")
        transcript += child.before
    assert transcript.count("dropping the oldest turns") == 1
    out = paste_while_reading(child, ("lorem ipsum 中文 😀 " * 3000)[:50_000] + "\r",
                              r"\[your message is \d+ tokens; only its last \d+ fit[\s\S]*\r\nYou: ")
    assert out.count("only its last") == 1
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --------------------------------------------------------------------------- scripted use

def test_piped_mode(short_ckpt):
    script = "hello\n\n/temp -1\n/temp 0\nnon-ASCII: 中文 😀\n".encode() + b"bad bytes \xff\xfe\n/quit\nnever read\n"
    run = subprocess.run([*CLI, "chat", str(short_ckpt)], input=script, capture_output=True, timeout=120)
    out = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()
    assert out.splitlines()[:3] == BANNER
    assert "You: hello\nHAVOC: " in out
    assert "error: temperature: expected a number >= 0, found -1.0" in out
    assert out.count("HAVOC: ") == 3 and "never read" not in out


def test_chat_havoc_py_and_one_prompt(short_ckpt):
    run = subprocess.run([sys.executable, str(ROOT / "chat_havoc.py"), str(short_ckpt), "--prompt", "Hi 😀",
                          "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[:3] == BANNER  # the banner stays out of the answer
    again = subprocess.run([*CLI, "chat", str(short_ckpt), "--prompt", "Hi 😀", "--temperature", "0"],
                           capture_output=True, text=True, timeout=120)
    assert again.stdout == run.stdout and run.stdout.startswith("HAVOC: ")


def test_int8_compiles_on_havocs_kernel_and_not_on_fbgemm(short_ckpt):
    """int8 chat runs HAVOC's kernel, a custom operator torch.compile keeps: `--compile` compiles and
    answers as eager does. With fbgemm's kernel (HAVOC_OWN_KERNELS=0), which torch.compile cannot
    trace, the chat says so and answers eager instead of compiling a slower step."""
    base = [*CLI, "chat", str(short_ckpt), "--prompt", "Hi", "--temperature", "0", "--quantize", "int8"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stdout.startswith("HAVOC: "), plain.stderr
    if kernel_isa():
        compiled = subprocess.run([*base, "--compile"], capture_output=True, text=True, timeout=300)
        assert compiled.returncode == 0, compiled.stderr
        assert "note:" not in compiled.stderr and compiled.stdout == plain.stdout
    env = {**os.environ, "HAVOC_OWN_KERNELS": "0"}
    fbgemm = subprocess.run([*base, "--compile"], capture_output=True, text=True, timeout=120, env=env)
    assert fbgemm.returncode == 0, fbgemm.stderr
    assert "note: --compile ignored for int8 weights on this CPU" in fbgemm.stderr
    assert fbgemm.stdout.startswith("HAVOC: ")


def test_int4_chat_names_its_kernel_and_answers(short_ckpt):
    """`--quantize int4` says which kernel it runs (HAVOC's int4 kernel where this CPU can build it,
    else ATen's) and a chat answers the same as from a checkpoint stored int4 by `havoc quantize`."""
    smoke = subprocess.run([*CLI, "smoke", str(short_ckpt), "--quantize", "int4"], capture_output=True, text=True,
                           timeout=120)
    assert smoke.returncode == 0, smoke.stderr
    kernel = "decode int4 (HAVOC " if kernel_isa() else "decode int4 (ATen int4pack)"
    assert kernel in smoke.stdout.splitlines()[0], smoke.stdout
    run = subprocess.run([*CLI, "chat", str(short_ckpt), "--prompt", "Hi", "--temperature", "0", "--quantize", "int4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("HAVOC: ")
    stored = short_ckpt.parent / "int4"
    assert subprocess.run([*CLI, "quantize", str(short_ckpt), str(stored)], capture_output=True,
                          timeout=120).returncode == 0
    again = subprocess.run([*CLI, "chat", str(stored), "--prompt", "Hi", "--temperature", "0"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == run.stdout


# --------------------------------------------------------------------------- bad input

def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_checkpoints(tmp_path, tok, short_ckpt, capsys, monkeypatch, tiny_model):
    assert "no such checkpoint" in error_of(capsys, ["chat", str(tmp_path / "nope")])
    bare = save_model(tmp_path / "bare", tiny_model(max_seq_len=64))
    assert "tokenizer.json" in error_of(capsys, ["chat", str(bare)])
    broken = save_model(tmp_path / "broken", tiny_model(max_seq_len=64), tokenizer=tok)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    assert "model.safetensors" in error_of(capsys, ["smoke", str(broken)])
    config = json.loads((short_ckpt / "config.json").read_text())
    config["mlp"]["hidden_dim"] = 256
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in short_ckpt.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    (wrong / "config.json").write_text(json.dumps(config))
    assert "mlp.hidden_dim" in error_of(capsys, ["generate", str(wrong), "--prompt", "x"])
    monkeypatch.chdir(tmp_path)
    assert re.search(r"make demo.*havoc sft", error_of(capsys, ["chat"]))
    assert "top_p" in error_of(capsys, ["chat", str(short_ckpt), "--top-p", "2", "--prompt", "x"])


def test_generate_and_smoke(short_ckpt, tmp_path, capsys, tiny_model):
    assert main(["generate", str(short_ckpt), "--prompt", "The import statement", "--temperature", "0",
                 "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and re.search(r"\d+ tokens in .* tokens/s", out.err)
    assert main(["smoke", str(short_ckpt)]) == 0
    out = capsys.readouterr().out
    assert out.count("HAVOC: ") == 3 and len(re.findall(r"\n\[\d+ tokens in [\d.]+ s: [\d.]+ tokens/s\]", out)) == 3
    nan = tiny_model(max_seq_len=128)
    with torch.no_grad():
        nan.layers[0].mlp.w2.weight.fill_(float("nan"))
    save_model(tmp_path / "nan", nan, tokenizer=HavocTokenizer.load(short_ckpt))
    assert main(["smoke", str(tmp_path / "nan")]) == 1
    assert "NaN" in capsys.readouterr().out
