"""GGUF export: a HAVOC checkpoint as one ``.gguf`` file that llama.cpp (and ollama, LM Studio,
llama-cpp-python) runs, written with ``gguf``, the llama.cpp project's own writer on PyPI.

The llama.cpp architecture is chosen from the config, never from a name, and every convention it
hard-codes is compensated in the written weights or refused by field (docs/GGUF.md):
- SwiGLU -> ``llama``: its rotary pairs adjacent channels (GPT-J "NORM" layout) where HAVOC pairs
  channel i with i + head_dim/2, so q/k rows are permuted per head (proved by parity tests).
  Biases of q/k/v/o are written (llama.cpp reads them when present). ``llama`` asserts that the
  rotary covers the whole head, so a partial ``attention.rotary_dim`` is refused.
- GeGLU -> ``gemma``: it multiplies the embedding by sqrt(d_model) and always reads the output
  head from that same matrix, so the embedding is written divided by sqrt(d_model) and the final
  norm's weight multiplied by it (exact). Its rotary is rotate-half (NEOX) over the first
  ``rope.dimension_count`` channels with frequencies from that count, as HAVOC's partial rotary, so
  any ``attention.rotary_dim`` works. It adds no attention-output bias: ``attention.bias`` is
  refused. Its GELU is the tanh form read from an fp16 table where HAVOC's is exact erf: no weight
  can compensate that, so the export says so.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from havoc_core.atomic import atomic_path
from havoc_core.checkpoint import CONFIG_FILE, find_checkpoint, load_weights
from havoc_core.config import HavocConfig
from havoc_core.errors import HavocError
from havoc_core.tokenizer import CHAT_TEMPLATE, ROLES, SPECIAL_TOKENS, HavocTokenizer

# 4-bit types come from llama.cpp's own quantizer (the code `llama-quantize` runs), through
# llama-cpp-python's C API: its k-quants choose per-tensor types and scales no numpy port matches
LLAMA_CPP_QUANTS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0", *LLAMA_CPP_QUANTS)
GELU_NOTE = ("note: mlp.activation \"gelu\": llama.cpp's gemma computes GELU with the tanh approximation from an "
             "fp16 table, HAVOC with exact erf; logits differ slightly (docs/GGUF.md gives the measured size)")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise HavocError("GGUF export needs the gguf package: pip install 'havoc[gguf]'") from None
    return gguf


def architecture(cfg: HavocConfig) -> str:
    """The llama.cpp architecture that computes this config's function, or a HavocError naming the
    field it cannot express and why."""
    a = cfg.attention
    if cfg.mlp.activation == "swiglu":
        if a.rotary_dim != a.head_dim:
            raise HavocError(f"attention.rotary_dim: llama.cpp's llama rotates the whole head and refuses to load "
                             f"anything else; expected {a.head_dim} (attention.head_dim), found {a.rotary_dim}")
        return "llama"
    if not cfg.tie_word_embeddings:
        raise HavocError("tie_word_embeddings: llama.cpp's gemma (the GeGLU architecture) always reads the "
                         "output head from the embedding; expected true, found false")
    if a.bias:
        raise HavocError("attention.bias: llama.cpp's gemma (the GeGLU architecture) never adds an attention-output "
                         "bias; expected false, found true")
    return "gemma"


def _rope_layout(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or biases) from HAVOC's rotate-half pairing (i, i + hd/2) to llama.cpp's adjacent
    pairs (2i, 2i + 1), head by head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_NAMES = {"attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
                "mlp.w1.weight": "ffn_gate.weight", "mlp.w3.weight": "ffn_up.weight",
                "mlp.w2.weight": "ffn_down.weight", "attn.o_proj.weight": "attn_output.weight",
                "attn.o_proj.bias": "attn_output.bias"}
for _p, _g in [("q", "q"), ("k", "k"), ("v", "v")]:
    _LAYER_NAMES |= {f"attn.{_p}_proj.weight": f"attn_{_g}.weight", f"attn.{_p}_proj.bias": f"attn_{_g}.bias"}


def gguf_tensors(state: dict[str, torch.Tensor], cfg: HavocConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every tensor, in llama.cpp's names and conventions."""
    a, scale = cfg.attention, math.sqrt(cfg.d_model)
    embed = state["embed.weight"].float()
    yield "token_embd.weight", (embed.double() / scale).float() if arch == "gemma" else embed
    for i in range(cfg.num_layers):
        for name, gname in _LAYER_NAMES.items():
            w = state.get(f"layers.{i}.{name}")
            if w is None:
                continue
            w = w.float()
            if arch == "llama" and name.startswith(("attn.q_proj", "attn.k_proj")):
                w = _rope_layout(w, a.num_heads if "q_proj" in name else a.num_kv_heads)
            yield f"blk.{i}.{gname}", w
    norm = state["norm.weight"].float()
    yield "output_norm.weight", (norm.double() * scale).float() if arch == "gemma" else norm
    if not cfg.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"].float()


def _qtype(gguf: Any, shape: tuple[int, ...], outtype: str) -> Any:
    """The GGML type a tensor is written in. 1-D tensors (norms, biases) stay F32, as llama.cpp's own
    converter keeps them; a matrix whose rows do not split into q8_0's 32-blocks falls back to F16."""
    q = gguf.GGMLQuantizationType
    if outtype == "f32" or len(shape) == 1:
        return q.F32
    if outtype == "q8_0":
        return q.Q8_0 if shape[-1] % 32 == 0 else q.F16
    return q.BF16 if outtype == "bf16" else q.F16


def _encode(gguf: Any, w: torch.Tensor, qtype: Any) -> np.ndarray:
    data = w.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _check_tokenizer(tok: HavocTokenizer, where: str) -> dict[str, Any]:
    """The tokenizer's JSON, after checking it is the byte-level BPE with GPT-2's split that the
    ``gpt2`` model and ``gpt-2`` pre-tokenizer of llama.cpp reproduce."""
    data = json.loads(tok.to_json())
    pre, model = data.get("pre_tokenizer") or {}, data.get("model") or {}
    checks = [("model.type", model.get("type"), "BPE"), ("normalizer", data.get("normalizer"), None),
              ("pre_tokenizer.type", pre.get("type"), "ByteLevel"),
              ("pre_tokenizer.use_regex", pre.get("use_regex"), True),
              ("pre_tokenizer.add_prefix_space", pre.get("add_prefix_space"), False)]
    for field, found, expected in checks:
        if found != expected:
            raise HavocError(f"{where}: {field}: GGUF export writes HAVOC's byte-level BPE; expected "
                             f"{json.dumps(expected)}, found {json.dumps(found)}")
    return data


def _add_tokenizer(writer: Any, gguf: Any, tok: HavocTokenizer, where: str) -> None:
    data = _check_tokenizer(tok, where)
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    if any(t is None for t in tokens):
        raise HavocError(f"{where}: vocabulary has a gap at id {tokens.index(None)}")
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    kinds = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split, the regex of tokenizers' ByteLevel(use_regex=True)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)  # HAVOC renders every prompt, chat or plain, after <|bos|>
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_hparams(writer: Any, cfg: HavocConfig, file_type: int) -> None:
    a = cfg.attention
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.mlp.hidden_dim)
    writer.add_head_count(a.num_heads)
    writer.add_head_count_kv(a.num_kv_heads)
    writer.add_key_length(a.head_dim)
    writer.add_value_length(a.head_dim)
    writer.add_rope_dimension_count(a.rotary_dim)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)


def modelfile(gguf_file: Path) -> str:
    """An ollama Modelfile for the export: HAVOC's chat format and every token that ends a turn."""
    turn = "".join(f"{{{{- if eq .Role \"{r}\" }}}}<|{r}|>{{{{ .Content }}}}<|eos|>{{{{ end }}}}" for r in ROLES)
    stops = "".join(f'PARAMETER stop "{t}"\n' for t in SPECIAL_TOKENS[:3] + [f"<|{r}|>" for r in ROLES])
    return (f"FROM ./{gguf_file.name}\n"
            f'TEMPLATE """{{{{- range .Messages }}}}{turn}{{{{- end }}}}<|assistant|>"""\n{stops}')


def _write(path: Path, state: dict[str, torch.Tensor], cfg: HavocConfig, tok: HavocTokenizer, outtype: str,
           name: str, where: str) -> None:
    gguf = _gguf()
    arch = architecture(cfg)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    _add_hparams(writer, cfg, int(file_type))
    _add_tokenizer(writer, gguf, tok, where)
    # tensor infos first (shapes and byte sizes), then the data one tensor at a time: memory holds
    # the checkpoint plus one converted tensor, whatever the model's size
    plan = [(name, tuple(w.shape), _qtype(gguf, tuple(w.shape), outtype))
            for name, w in gguf_tensors(state, cfg, arch)]
    for name, shape, qtype in plan:
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
        writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    tensors = zip(plan, gguf_tensors(state, cfg, arch), strict=True)
    for (_, _, qtype), (_, w) in tqdm(tensors, total=len(plan), desc=f"gguf {outtype}", unit="tensor", disable=None):
        writer.write_tensor_data(_encode(gguf, w, qtype))
    writer.close()


@contextmanager
def _stderr_to(log: IO[bytes]) -> Iterator[None]:
    """Send file descriptor 2 (where llama.cpp's C code prints, tensor by tensor) to ``log``."""
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _llama_quantize(src: Path, dst: Path, outtype: str) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise HavocError(f"--outtype {outtype}: needs llama.cpp's quantizer: pip install llama-cpp-python, or "
                         "run llama.cpp's llama-quantize on an f32 export (docs/GGUF.md)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_QUANTS[outtype])
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile() as log:
        with _stderr_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            log.seek(0)
            last = (log.read().decode(errors="replace").strip().splitlines() or [""])[-1]
            raise HavocError(f"{dst}: llama.cpp's quantizer failed (return code {rc}): {last}")


def export_gguf(checkpoint: str | Path, out: str | Path, outtype: str = "f32", *, force: bool = False,
                tokenizer: str | Path | None = None) -> Path:
    """Write ``out`` (one .gguf: hyper-parameters, tokenizer, chat template, weights) and an ollama
    ``<stem>.Modelfile`` beside it, each atomically. Refuses before reading any weight."""
    _gguf()
    if outtype not in OUTTYPES:
        raise HavocError(f"--outtype: expected one of {', '.join(OUTTYPES)}, found {outtype!r}")
    out = Path(out)
    if out.is_dir():
        raise HavocError(f"{out}: is a directory; give the .gguf file to write")
    if out.exists() and not force:
        raise HavocError(f"{out}: already exists (pass --force to overwrite)")
    ckpt = find_checkpoint(checkpoint)
    cfg = HavocConfig.load(ckpt / CONFIG_FILE)
    if architecture(cfg) == "gemma":
        print(GELU_NOTE)
    tok_path = Path(tokenizer) if tokenizer else ckpt
    tok = HavocTokenizer.load(tok_path)
    tok.check_compatible(cfg)
    state = load_weights(ckpt, cfg)
    try:
        with atomic_path(out) as tmp:
            if outtype in LLAMA_CPP_QUANTS:  # from f32, the most precise source llama.cpp's quantizer takes
                f32 = tmp.with_name(tmp.name + ".f32")
                try:
                    _write(f32, state, cfg, tok, "f32", ckpt.name, str(tok_path))
                    _llama_quantize(f32, tmp, outtype)
                finally:
                    f32.unlink(missing_ok=True)
            else:
                _write(tmp, state, cfg, tok, outtype, ckpt.name, str(tok_path))
        with atomic_path(out.with_suffix(".Modelfile")) as tmp:
            tmp.write_text(modelfile(out))
    except OSError as e:
        raise HavocError(f"{out}: cannot write ({e.strerror or e})") from None
    return out
