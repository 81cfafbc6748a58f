"""`havoc quantize`: a saved int4/int8 checkpoint loads as stored (no second quantization), gives the
same tokens and logits as quantizing at load time, on another CPU kind too, and is refused by
name wherever float weights are needed; on a real tokenizer and a real tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from havoc_core import AttentionConfig, HavocModel
from havoc_core.checkpoint import QUANTIZATION_FILE, WEIGHTS_FILE, save_model
from havoc_core.engine import Engine
from havoc_core.errors import HavocError
from havoc_core.inference import load
from havoc_core.integrity import MANIFEST_FILE
from havoc_core.precision import AVX2_EMULATION
from havoc_core.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
PROMPT = "The import statement"


def havoc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "havoc_core.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def float_checkpoint(tiny_model, tok, tmp_path_factory) -> Path:
    """An untied tiny model with attention biases: every kind of matrix a checkpoint can hold."""
    model = tiny_model(tie_word_embeddings=False, attention=AttentionConfig(num_heads=4, num_kv_heads=2, bias=True))
    return save_model(tmp_path_factory.mktemp("float") / "ckpt", model, tokenizer=tok)


def run(checkpoint: Path, slots: int = 1, **kwargs) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the prefill's logits through an engine of ``slots`` slots, as `havoc chat`
    (one slot) or `havoc serve` (several) would load it."""
    loaded = load(checkpoint, device="cpu", **kwargs)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=slots)
    ids = loaded.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        logits = engine._prefill_rows([(0, ids, 0)])
    return engine.generate([PROMPT], GREEDY)[0].ids, logits


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_checkpoint_loads_as_stored_on_another_cpu_kind(float_checkpoint, tmp_path, method):
    """Quantized in a process that runs ATen's AVX2 kernels (whose int4 layout differs from the
    AVX-512 one), loaded here: the same logits, bit for bit, and the same tokens as quantizing the
    float checkpoint at load time. The file holds the small integer codes, not float weights."""
    out = tmp_path / "q"
    done = havoc("quantize", str(float_checkpoint), str(out), "--quantize", method,
                 env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    stored = load(out, device="cpu")
    assert stored.plan.quantize == method  # from quantization.json, no flag needed
    tokens, logits = run(out)
    expected_tokens, expected_logits = run(float_checkpoint, quantize=method)
    assert tokens == expected_tokens
    assert torch.equal(logits, expected_logits)
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    code = "U8" if method == "int4" else "I8"
    assert dtypes["layers.0.attn.qkv_proj.qweight" if method == "int4" else "layers.0.attn.qkv_proj.weight"] == code
    assert dtypes["lm_head.weight"] == "I8"  # the head stays int8 under int4
    assert json.loads((out / QUANTIZATION_FILE).read_text())["method"] == method
    # (an int8 file keeps the fp32 embedding its activations use; int4 keeps a bf16 one)
    ratio = (out / WEIGHTS_FILE).stat().st_size / (float_checkpoint / WEIGHTS_FILE).stat().st_size
    assert ratio < (0.35 if method == "int4" else 0.55)
    assert havoc("inspect", str(out), "--verify").returncode == 0  # its checksums.json covers it


@pytest.mark.parametrize("method,slots", [("int8", 1), ("int8", 4), ("int4", 1), ("int4", 4)])
def test_quantized_logits_are_the_same_on_an_avx2_cpu(float_checkpoint, tmp_path, method, slots):
    """fbgemm picks its int8 kernels by CPU (AVX-512 VNNI here, AVX2's pairwise 16-bit products on
    older CPUs): with 7-bit activations (``reduce_range``) both sum exact integer products, so a
    chat (one slot: plain rows) and a server (row-wise ranges, ``InferenceLinear._int8``) give the
    same logits and tokens, bit for bit, under this machine's kernels and under AVX2 emulation.
    HAVOC's int4 kernel has an AVX2 build made to give the same bits (``quant_kernel``)."""
    out = tmp_path / "avx2.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from test_quantize import run; "
            "torch.save(run(sys.argv[2], int(sys.argv[3]), quantize=sys.argv[5]), sys.argv[4])")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(float_checkpoint), str(slots),
                           str(out), method], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **AVX2_EMULATION})
    assert done.returncode == 0, done.stderr
    tokens, logits = torch.load(out)
    expected_tokens, expected_logits = run(float_checkpoint, slots, quantize=method)
    assert tokens == expected_tokens
    assert torch.equal(logits, expected_logits)


def test_quantized_checkpoint_is_refused_where_float_weights_are_needed(float_checkpoint, tmp_path):
    out = tmp_path / "q"
    assert havoc("quantize", str(float_checkpoint), str(out)).returncode == 0
    with pytest.raises(HavocError, match=f"{QUANTIZATION_FILE}: a quantized checkpoint"):
        HavocModel.from_pretrained(out)
    with pytest.raises(HavocError, match="this checkpoint is stored int4"):
        load(out, device="cpu", quantize="int8")
    done = havoc("export", str(out), str(tmp_path / "hf"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and QUANTIZATION_FILE in done.stderr


def test_tampered_quantized_checkpoint_names_the_tensor(float_checkpoint, tmp_path):
    """A part of the wrong shape (the checksums rewritten to match, as a careless tool would) is
    refused before use, by file and tensor name and the expected form."""
    out = tmp_path / "q"
    assert havoc("quantize", str(float_checkpoint), str(out)).returncode == 0
    state = load_file(out / WEIGHTS_FILE)
    state["layers.1.mlp.w2.qweight"] = state["layers.1.mlp.w2.qweight"][:, :-1].contiguous()
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / MANIFEST_FILE).unlink()
    done = havoc("smoke", str(out))  # (stderr also notes the missing checksums.json)
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert "model.safetensors: layers.1.mlp.w2.qweight: expected uint8 [64, 64] (int4 form of a 64x128 matrix)" \
        in done.stderr
    (out / QUANTIZATION_FILE).write_text('{"method": "int3", "group_size": 32}')
    with pytest.raises(HavocError, match="quantization.json: method: expected int8 or int4, found 'int3'"):
        load(out, device="cpu")
