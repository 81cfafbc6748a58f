"""HAVOC's int4 kernel (int4_kernel.c, built here with the system's compiler): each output is the
exact product of the stored int4 matrix and the activations rounded to int8 per group of 32 (a
float64 reference written from the definition), a row's result is the same in any batch, the AVX2
build gives the same bits as the AVX-512 one, a compiled decode step keeps it, and without a
compiler ATen's kernel takes over with a one-line note."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from havoc_core import int4_kernel
from havoc_core.engine import Engine
from havoc_core.inference import prepare_model
from havoc_core.precision import AVX2_EMULATION, int4_kernel_isa
from havoc_core.quantized import quantize_matrix
from havoc_core.sampling import SamplingParams

SHAPES = [(13, 96), (64, 256), (1280, 768)]  # (13, 96): rows and groups padded to whole tiles and blocks
CAN_BUILD = int4_kernel_isa() is not None and (shutil.which("cc") or shutil.which("gcc")) is not None


@pytest.fixture(scope="module")
def kernel() -> int4_kernel.Kernel:
    built = int4_kernel.load()
    if not CAN_BUILD:
        pytest.skip(f"no int4 kernel for this machine: {built}")
    assert isinstance(built, int4_kernel.Kernel), built  # an x86 CPU with a compiler must build it
    return built


def matrix(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random int4 matrix: its kernel layout, and its codes and (scale, zero) per group as stored."""
    torch.manual_seed(seed)
    parts = quantize_matrix(torch.randn(n, k) * 0.02, "int4")
    return int4_kernel.layout(parts["qweight"], parts["qscale"]), parts["qweight"], parts["qscale"]


def dequantized(qweight: torch.Tensor, qscale: torch.Tensor) -> torch.Tensor:
    """value = scale x (code - 8) + zero (quantized.quantize_matrix), computed in fp32."""
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(qweight.shape[0], -1).float()
    scale, zero = (qscale.float()[..., i].t().repeat_interleave(32, 1) for i in (0, 1))
    return scale * (codes - 8) + zero


def rounded(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel multiplies them: int8 codes times one fp32 scale per group of 32."""
    groups = x.float().view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((groups * inv).round().clamp(-127, 127) * (amax / 127)).view(x.shape)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_the_product_of_its_rounded_inputs(kernel, n, k, dtype):
    packed, qweight, qscale = matrix(n, k)
    x = torch.randn(5, k).to(dtype)
    exact = rounded(x).double() @ dequantized(qweight, qscale).double().t()
    y = kernel.linear(x, packed, n)
    assert y.dtype == dtype and y.shape == (5, n)
    # fp32 sums of exact group products; a bf16 output is rounded once more
    tolerance = (2e-6 if dtype == torch.float32 else 2**-8) * exact.abs().amax(-1, keepdim=True)
    assert ((y.double() - exact).abs() <= tolerance).all()


@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantized_matrix_is_exact(kernel, n, k):
    packed, qweight, qscale = matrix(n, k)
    expected = dequantized(qweight, qscale)
    assert torch.equal(kernel.dequantize(packed, n, k, torch.float32), expected)
    assert torch.equal(kernel.dequantize(packed, n, k, torch.float32, (5, 11)), expected[5:11])
    assert torch.equal(kernel.dequantize(packed, n, k, torch.bfloat16), expected.bfloat16())


def test_a_row_is_the_same_in_any_batch(kernel):
    """Rows go through the kernel 4 at a time; each output is made by the same operations whatever
    its neighbours, so a seeded request decodes alike alone or batched."""
    packed, _, _ = matrix(64, 256)
    x = torch.randn(9, 256)
    together = kernel.linear(x, packed, 64)
    for rows in (1, 2, 3, 4, 5, 9):
        assert torch.equal(kernel.linear(x[:rows], packed, 64), together[:rows])
    alone = torch.cat([kernel.linear(x[i:i + 1], packed, 64) for i in range(9)])
    assert torch.equal(alone, together)


AVX2_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_int4_kernel import SHAPES, matrix
from havoc_core import int4_kernel
kernel = int4_kernel.load()
assert kernel.isa == "avx2", kernel
torch.manual_seed(1)
torch.save([kernel.linear(torch.randn(6, k), matrix(n, k)[0], n) for n, k in SHAPES], sys.argv[2])
"""


def test_avx2_build_gives_the_same_bits(kernel, tmp_path):
    """The AVX2 build (pair sums of 8-bit products, 8 lanes) and the AVX-512 VNNI one (16 lanes) make
    each output with the same float operations in the same order."""
    out = tmp_path / "avx2.pt"
    done = subprocess.run([sys.executable, "-c", AVX2_RUN, os.path.dirname(__file__), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **AVX2_EMULATION})
    assert done.returncode == 0, done.stderr
    torch.manual_seed(1)
    here = [kernel.linear(torch.randn(6, k), matrix(n, k)[0], n) for n, k in SHAPES]
    assert all(torch.equal(a, b) for a, b in zip(torch.load(out), here, strict=True))


@pytest.mark.slow
def test_compiled_int4_decode_equals_eager(kernel, model, tok, prompt_ids):
    """Under torch.compile the kernel is one custom operator (no graph break, same results)."""
    fast = prepare_model(copy.deepcopy(model), torch.float32, "int4")
    prompts = [prompt_ids("The import statement"), prompt_ids("x")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    eager = Engine(fast, tok, max_batch=2).generate(prompts, greedy)
    compiled = Engine(fast, tok, max_batch=2, compile=True).generate(prompts, greedy)
    assert [c.ids for c in compiled] == [e.ids for e in eager]


FALLBACK_RUN = """
import torch
from havoc_core import int4_kernel
from havoc_core.inference import InferenceLinear
layer = InferenceLinear(torch.randn(64, 128) * 0.02, None, "int4", torch.bfloat16)
assert layer.int4[1] is not None  # ATen's layout and its scales
x = torch.randn(3, 128).bfloat16()
print(float((layer(x).float() - x.float() @ (layer(torch.eye(128).bfloat16()).float())).abs().max()))
"""


def test_without_a_compiler_aten_runs_with_a_note(tmp_path):
    done = subprocess.run([sys.executable, "-c", FALLBACK_RUN], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"), "HAVOC_KERNEL_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 0.05  # ATen's int4 product
    if int4_kernel_isa() is not None:
        note = [line for line in done.stderr.splitlines() if "int4" in line]
        assert len(note) == 1 and note[0].startswith("note: int4: own kernel not built"), done.stderr
        assert "no-such-cc" in note[0] and "ATen's int4pack kernel runs instead" in note[0]
