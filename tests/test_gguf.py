"""`havoc export --format gguf`, checked two ways: the written file read back with gguf's own reader
(always), and the file run by llama.cpp itself (llama-cpp-python, compiled from its PyPI sdist),
against HAVOC's fp32 model on the same ids: logits, greedy continuations, tokenization, q8_0/f16."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from havoc_core import AttentionConfig, HavocModel, MLPConfig
from havoc_core.checkpoint import save_model
from havoc_core.gguf_export import export_gguf
from havoc_core.tokenizer import CHAT_TEMPLATE, render_chat

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install 'havoc[gguf]')")
try:
    import llama_cpp
except ImportError:  # the llama.cpp tests skip with this reason; the reader tests still run
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed: "
                                 "pip install llama-cpp-python (compiles llama.cpp, ~15 min)")

GEGLU = MLPConfig(hidden_dim=128, activation="gelu")
SHAPES = {  # llama (SwiGLU: tied, untied, q/k/v/o biases) and gemma (GeGLU, head_dim 24 != 64 / 4, rotary full or 16)
    "swiglu": {},
    "untied": {"tie_word_embeddings": False},
    "bias": {"attention": AttentionConfig(num_heads=4, num_kv_heads=2, bias=True)},
    "geglu": {"mlp": GEGLU, "attention": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=24)},
    "geglu_partial": {"mlp": GEGLU, "attention": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=24,
                                                                 rotary_dim=16)},
}
TEXTS = ["Hello, world! It's 3.14159 o'clock; we'll see.", "def f(x):\n    return x ** 2  # square\n\n\n",
         "tabs\t\tand   spaces    \n\n  end  ", "naïve café, Ærøskøbing, Łódź, São Paulo",
         "中文字符和日本語のテキスト", "emoji 😀👍🏽 🇫🇷 and ZWJ 👨‍👩‍👧", "<|eos|> <|user|> typed as text",
         "\na\n\n b \r\n\tc", "x" * 300, "   leading spaces", "12345678901234567890 1,000,000"]


def _ids(tok, n: int = 64) -> list[int]:
    from pydoc_data.topics import topics

    return [tok.bos_id, *tok.encode(topics["import"])][:n]


@pytest.fixture(scope="module", autouse=True)
def _weights_as_written() -> Iterator[None]:
    """llama.cpp computes on the weights as the file stores them, with its plain CPU kernels, on every
    machine: no "extra buffer types" (``llama-cli --no-repack``), which repack Q8_0/Q4 weights for the
    CPU at hand. On an Intel Xeon with AMX, llama.cpp 0.3.36's AMX matmul crashed the process (SIGSEGV:
    ``ldtilecfg`` of an invalid tile configuration) on the first Q8_0 product, 64- and 512-wide models
    alike (docs/GGUF.md)."""
    if llama_cpp is None:
        yield
        return
    from llama_cpp import llama_cpp as c_api

    default = c_api.llama_model_default_params

    def params() -> c_api.llama_model_params:
        p = default()
        p.use_extra_bufts = False
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c_api, "llama_model_default_params", params)
        yield


def _random_biases(model: HavocModel) -> HavocModel:
    """HAVOC initialises biases to zero, which would test nothing: give them the weights' scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tok, tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {name: save_model(root / name, _random_biases(tiny_model(**kw)), tokenizer=tok)
            for name, kw in SHAPES.items()}


@pytest.fixture(scope="module")
def trained(tok, tiny_config, tmp_path_factory) -> Path:
    """A tiny model trained for 60 real steps on the pydoc topics (ordinary init scale)."""
    from pydoc_data.topics import topics

    torch.manual_seed(0)
    model = HavocModel(tiny_config(initializer_range=0.02))
    ids = torch.tensor([t for k in sorted(topics) for t in tok.encode(topics[k])][: 128 * 97]).view(128, 97)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = ids[(step * 8) % 120:][:8]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(tmp_path_factory.mktemp("trained") / "checkpoint_step_60", model.eval(), tokenizer=tok)


def _havoc_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    from havoc_core.model import load_model

    model = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def _havoc_greedy(ckpt: Path, ids: list[int], n: int) -> list[int]:
    from havoc_core.model import load_model

    model, ids = load_model(ckpt, dtype=torch.float32), list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def _llama(path: Path) -> llama_cpp.Llama:
    """f32 KV cache (llama.cpp's default is f16, which alone moves logits by ~4e-2 on this scale)."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=96, n_batch=96, n_threads=2, logits_all=True,
                           verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _llama_greedy(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    """Greedy decoding in llama.cpp's own KV cache: the prompt once, then one token per eval."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


# --------------------------------------------------------------------------- the file, read back by gguf

@pytest.mark.parametrize("name", list(SHAPES))
def test_written_metadata_and_tensors_read_back(name, checkpoints, tok, tmp_path):
    from havoc_core.config import HavocConfig
    from havoc_core.gguf_export import architecture

    out = export_gguf(checkpoints[name], tmp_path / "m.gguf")
    cfg = HavocConfig.load(checkpoints[name] / "config.json")
    arch = architecture(cfg)
    r = _reader(out)
    assert _field(r, "general.architecture") == arch == ("gemma" if name.startswith("geglu") else "llama")
    assert _field(r, f"{arch}.attention.key_length") == cfg.attention.head_dim
    assert _field(r, f"{arch}.rope.dimension_count") == cfg.attention.rotary_dim
    assert _field(r, f"{arch}.block_count") == 2 and _field(r, f"{arch}.context_length") == 96
    assert _field(r, "tokenizer.ggml.tokens") == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2" and _field(r, "tokenizer.ggml.add_bos_token") is True
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:6] == [3] * 6 and set(types[6:]) == {1}  # the special tokens are control tokens
    tensors = {t.name: t for t in r.tensors}
    assert ("output.weight" in tensors) == (name == "untied")
    biases = {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in ("q", "k", "v", "output")}
    assert {n for n in tensors if n.endswith(".bias")} == (biases if name == "bias" else set())
    from safetensors.torch import load_file

    weights = load_file(checkpoints[name] / "model.safetensors")
    embed = np.asarray(tensors["token_embd.weight"].data)
    scale = math.sqrt(cfg.d_model) if arch == "gemma" else 1.0
    np.testing.assert_allclose(embed * scale, weights["embed.weight"].numpy(), rtol=1e-6, atol=1e-7)
    assert (tmp_path / "m.Modelfile").read_text().startswith("FROM ./m.gguf\n")


def test_q8_0_blocks_dequantize_to_the_weights(checkpoints, tmp_path):
    from safetensors.torch import load_file

    out = export_gguf(checkpoints["untied"], tmp_path / "q.gguf", "q8_0")
    t = {t.name: t for t in _reader(out).tensors}["output.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = load_file(checkpoints["untied"] / "model.safetensors")["lm_head.weight"].numpy()
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
    step = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # one q8_0 step per 32-block
    # half a step from rounding, plus 127 steps x the fp16 rounding of the block's scale (2^-11)
    assert np.all(np.abs(back - w).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-7)
    assert np.abs(back - w).max() > 0  # really quantized


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "havoc_core.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_refusals_are_one_line_and_write_nothing(checkpoints, tiny_model, tok, tmp_path):
    untied_geglu = save_model(tmp_path / "ug", tiny_model(**SHAPES["geglu"], tie_word_embeddings=False),
                              tokenizer=tok)
    bias_geglu = save_model(tmp_path / "bg", tiny_model(mlp=GEGLU, attention=AttentionConfig(
        num_heads=4, num_kv_heads=2, head_dim=24, bias=True)), tokenizer=tok)
    partial = save_model(tmp_path / "pr", tiny_model(attention=AttentionConfig(num_heads=4, num_kv_heads=2,
                                                                               rotary_dim=8)), tokenizer=tok)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [((str(untied_geglu), str(tmp_path / "a.gguf")), "tie_word_embeddings: llama.cpp's gemma"),
             ((str(bias_geglu), str(tmp_path / "e.gguf")), "attention.bias: llama.cpp's gemma (the GeGLU architecture) "
              "never adds an attention-output bias"),
             ((str(partial), str(tmp_path / "b.gguf")), "attention.rotary_dim: llama.cpp's llama rotates the whole"),
             ((str(checkpoints["swiglu"]), str(existing)), "already exists (pass --force"),
             ((str(checkpoints["swiglu"]), str(tmp_path)), "is a directory"),
             ((str(checkpoints["swiglu"]), str(tmp_path / "c.gguf"), "--outtype", "q4"), "invalid choice"),
             ((str(checkpoints["swiglu"]), str(tmp_path / "hf"), "--format", "hf", "--outtype", "f16"),
              "--outtype: only with --format gguf")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(((str(checkpoints["swiglu"]), str(locked / "d.gguf")), "cannot write"))
    for args, message in cases:
        fmt = [] if "--format" in args else ["--format", "gguf"]
        r = _cli("export", *args, *fmt)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        errors = [line for line in r.stderr.splitlines() if "error" in line]  # argparse adds its usage lines
        assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg", "exists.gguf", "locked", "pr", "ug"]
    r = _cli("export", str(checkpoints["swiglu"]), str(existing), "--format", "gguf", "--force")
    assert r.returncode == 0 and existing.read_bytes()[:4] == b"GGUF", r.stderr


# --------------------------------------------------------------------------- the file, run by llama.cpp

@needs_llama
@pytest.mark.parametrize("name", list(SHAPES))
def test_llama_cpp_logits_and_greedy_match_havoc(name, checkpoints, tok, tmp_path):
    """f32 GGUF vs HAVOC fp32 on the same 64 ids (logits up to ~10). SwiGLU (llama) agrees to float rounding;
    GeGLU (gemma) by the GELU llama.cpp computes: the tanh form read from a table indexed by the input rounded
    to fp16, where HAVOC computes exact erf (docs/GGUF.md: the gap measured and taken apart)."""
    ids = _ids(tok)
    llm = _llama(export_gguf(checkpoints[name], tmp_path / "m.gguf"))
    ours, theirs = _havoc_logits(checkpoints[name], ids), _llama_logits(llm, ids)
    diff, scale = np.abs(ours - theirs).max(), np.abs(ours).max()
    # measured (max abs, logits up to ~10): swiglu 3.0e-5, untied 4.5e-5, bias 4.0e-5; geglu 6.0e-3, partial 9.1e-3
    assert diff < (1.5e-2 if name.startswith("geglu") else 1e-3), (diff, scale)
    assert _llama_greedy(llm, ids[:32], 32) == _havoc_greedy(checkpoints[name], ids[:32], 32)


@needs_llama
def test_without_the_rope_permutation_llama_cpp_disagrees(checkpoints, tok, tmp_path, monkeypatch):
    """The q/k permutation is what makes the llama layout right: written without it, logits differ."""
    from havoc_core import gguf_export

    monkeypatch.setattr(gguf_export, "_rope_layout", lambda w, heads: w)
    ids = _ids(tok)
    llm = _llama(export_gguf(checkpoints["swiglu"], tmp_path / "m.gguf"))
    assert np.abs(_havoc_logits(checkpoints["swiglu"], ids) - _llama_logits(llm, ids)).max() > 0.1


@needs_llama
def test_llama_cpp_tokenizes_like_havoc(checkpoints, tok, tmp_path):
    llm = _llama(export_gguf(checkpoints["swiglu"], tmp_path / "m.gguf"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode() == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve 😀?"},
            {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And\n\tthen"}]
    ids, _ = render_chat(tok, chat, add_generation_prompt=True)
    rendered = "".join(f"<|{m['role']}|>{m['content']}<|eos|>" for m in chat) + "<|assistant|>"
    # role and end tokens parse as control tokens; <|bos|> comes from add_bos_token, as HAVOC renders it
    assert llm.tokenize(rendered.encode(), add_bos=True, special=True) == ids


def _ollama_render(template: str, messages: list[dict[str, str]]) -> str:
    """What ollama's Go text/template makes of the Modelfile's TEMPLATE for ``messages``, for the actions
    the export writes (``range .Messages``, ``if eq .Role "..."``, ``.Content``, ``end``; ``{{-`` trims the
    text before it): any other action fails the test rather than being guessed at."""
    items: list[tuple[str, str]] = []
    for part in re.split(r"(\{\{.*?\}\})", template, flags=re.S):
        if not part.startswith("{{"):
            items.append(("text", part))
            continue
        if part.startswith("{{- ") and items and items[-1][0] == "text":
            items[-1] = ("text", items[-1][1].rstrip())
        assert not part.endswith(" -}}"), part  # (not written; trimming after would need handling here)
        items.append(("action", part.removeprefix("{{").removeprefix("-").removesuffix("}}").strip()))

    out: list[str] = []

    def block(i: int, message: dict[str, str] | None, emit: bool) -> int:
        """Run items from i to their ``end``; returns the index after it."""
        while i < len(items):
            kind, body = items[i]
            i += 1
            role = re.fullmatch(r'if eq \.Role "(\w+)"', body)
            if kind == "text":
                out.extend([body] if emit else [])
            elif body == "end":
                return i
            elif body == "range .Messages":
                after = block(i, None, False)
                for m in messages if emit else []:
                    block(i, m, True)
                i = after
            elif role:
                i = block(i, message, emit and message is not None and message["role"] == role.group(1))
            elif body == ".Content":
                out.extend([message["content"]] if emit and message is not None else [])
            else:
                raise AssertionError(f"the Modelfile uses an action this check does not know: {{{{ {body} }}}}")
        return i

    assert block(0, None, True) == len(items)
    return "".join(out)


def test_ollama_modelfile_renders_havoc_chat_format_and_stops_every_turn(checkpoints, tok, tmp_path):
    """The Modelfile beside the .gguf: its TEMPLATE (Go template syntax) gives HAVOC's chat format, as
    render_chat and the GGUF's Jinja template do, and its stop parameters are exactly the tokens that end a
    reply in HAVOC (<|eos|> and turn_stop_ids). ollama itself is not on PyPI, so the template is evaluated
    by the small interpreter above."""
    import jinja2

    export_gguf(checkpoints["swiglu"], tmp_path / "m.gguf")
    lines = (tmp_path / "m.Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./m.gguf"
    template = re.fullmatch(r'TEMPLATE """(.*)"""', lines[1], re.S)
    assert template is not None, lines[1]
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in lines[2:]]
    assert all(line.startswith("PARAMETER stop ") for line in lines[2:]) and len(stops) == len(set(stops))
    assert sorted(tok.token_to_id(t) for t in stops) == sorted([tok.eos_id, *tok.turn_stop_ids()])
    for role in ("system", "user", "assistant"):  # the pieces, as written
        assert f'{{{{- if eq .Role "{role}" }}}}<|{role}|>{{{{ .Content }}}}<|eos|>{{{{ end }}}}' in template[1]
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "  naïve 😀?\n\n"},
              {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And\n\tthen <b>&</b>"}]]
    for chat in chats:
        rendered = _ollama_render(template[1], chat)
        ids, _ = render_chat(tok, chat, add_generation_prompt=True)
        # <|bos|> is not in the template: llama.cpp (and so ollama) adds it from tokenizer.ggml.add_bos_token
        assert rendered == tok.decode(ids[1:], skip_special_tokens=False), rendered
        jinja = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
            messages=chat, add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>")
        assert "<|bos|>" + rendered == jinja


@needs_llama
def test_chat_completion_through_the_gguf_template(trained, tok, tmp_path):
    """llama-cpp-python's chat API renders the GGUF's chat template and stops at <|eos|>: its
    greedy reply is HAVOC's greedy reply to the same conversation."""
    llm = llama_cpp.Llama(model_path=str(export_gguf(trained, tmp_path / "m.gguf")), n_ctx=96, n_threads=2,
                          verbose=False)
    chat = [{"role": "user", "content": "What does the import statement do?"}]
    reply = llm.create_chat_completion(chat, temperature=0.0, top_k=1, max_tokens=16)["choices"][0]
    prompt, _ = render_chat(tok, chat, add_generation_prompt=True)
    ours = _havoc_greedy(trained, prompt, 16)
    text = tok.decode(ours[: ours.index(tok.eos_id)] if tok.eos_id in ours else ours)
    assert reply["message"]["content"] == text


@needs_llama
def test_f16_greedy_and_q8_0_perplexity_on_a_trained_model(trained, tok, tmp_path):
    from pydoc_data.topics import topics

    ids = _ids(tok, 96)
    f16 = _llama(export_gguf(trained, tmp_path / "f16.gguf", "f16"))
    assert _llama_greedy(f16, ids[:48], 32) == _havoc_greedy(trained, ids[:48], 32)
    held_out = [tok.bos_id, *tok.encode(topics["while"])][:96]  # not in the 60 training batches' rows

    def perplexity(llm: llama_cpp.Llama) -> float:
        logits = torch.tensor(_llama_logits(llm, held_out))
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(held_out[1:])).item())

    f32, q8, q4 = (perplexity(_llama(export_gguf(trained, tmp_path / f"{t}.gguf", t)))
                   for t in ("f32", "q8_0", "q4_k_m"))
    assert abs(q8 / f32 - 1) < 0.01, (f32, q8)
    # llama.cpp's own quantizer: rows of 64 are not 256-blocks, so it falls back to q5_0 / q8_0 here
    kinds = {t.tensor_type.name for t in _reader(tmp_path / "q4_k_m.gguf").tensors}
    assert {"Q5_0", "Q8_0"} <= kinds and abs(q4 / f32 - 1) < 0.05, (kinds, f32, q4)
