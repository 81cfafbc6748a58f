"""HAVOC's int4 and int8 kernels (quant_kernel.c, built here with the system's compiler): each output
is the exact product of the stored matrix and the activations rounded to int8 per group of 32 (a
float64 reference written from the definition), a row's result is the same in any batch, the AVX2
build gives the same bits as the AVX-512 one, a compiled decode step keeps them, and without a
compiler ATen's int4 and fbgemm's int8 kernels take over with a one-line note."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from havoc_core import quant_kernel
from havoc_core.engine import Engine
from havoc_core.inference import InferenceLinear, prepare_model
from havoc_core.precision import AVX2_EMULATION, kernel_isa
from havoc_core.quantized import quantize_matrix
from havoc_core.sampling import SamplingParams

SHAPES = [(13, 96), (64, 256), (1280, 768)]  # (13, 96): rows and groups padded to whole tiles and blocks
INT8_SHAPES = [*SHAPES, (7, 100)]  # int8 matrices need no whole groups: inputs padded with zero codes
CASES = [("int4", n, k) for n, k in SHAPES] + [("int8", n, k) for n, k in INT8_SHAPES]
CAN_BUILD = kernel_isa() is not None and (shutil.which("cc") or shutil.which("gcc")) is not None


@pytest.fixture(scope="module")
def kernel() -> quant_kernel.Kernel:
    built = quant_kernel.load()
    if not CAN_BUILD:
        pytest.skip(f"no kernel for this machine: {built}")
    assert isinstance(built, quant_kernel.Kernel), built  # an x86 CPU with a compiler must build it
    return built


def matrix(n: int, k: int, seed: int = 0, bits: str = "int4") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A random quantized matrix: its kernel layout, its row scales (int8) or None (int4), and the
    float64 matrix it stands for."""
    torch.manual_seed(seed)
    parts = quantize_matrix(torch.randn(n, k) * 0.02, bits)  # type: ignore[arg-type]
    if bits == "int8":
        exact = parts["weight"].double() * parts["scale"].double()[:, None]
        return quant_kernel.int8_layout(parts["weight"]), parts["scale"], exact
    return quant_kernel.int4_layout(parts["qweight"], parts["qscale"]), None, dequantized(parts["qweight"],
                                                                                          parts["qscale"]).double()


def dequantized(qweight: torch.Tensor, qscale: torch.Tensor) -> torch.Tensor:
    """value = scale x (code - 8) + zero (quantized.quantize_matrix), computed in fp32."""
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(qweight.shape[0], -1).float()
    scale, zero = (qscale.float()[..., i].t().repeat_interleave(32, 1) for i in (0, 1))
    return scale * (codes - 8) + zero


def rounded(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel multiplies them: int8 codes times one fp32 scale per group of 32
    (a last partial group padded with zeros)."""
    k = x.shape[-1]
    groups = torch.nn.functional.pad(x.float(), (0, -k % 32)).view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((groups * inv).round().clamp(-127, 127) * (amax / 127)).view(x.shape[0], -1)[:, :k]


@pytest.mark.parametrize("bits,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_the_product_of_its_rounded_inputs(kernel, bits, n, k, dtype):
    packed, scale, exact_matrix = matrix(n, k, bits=bits)
    x = torch.randn(5, k).to(dtype)
    exact = rounded(x).double() @ exact_matrix.t()
    y = kernel.linear(x, packed, n, scale)
    assert y.dtype == dtype and y.shape == (5, n)
    # fp32 sums of exact group products; a bf16 output is rounded once more
    tolerance = (2e-6 if dtype == torch.float32 else 2**-8) * exact.abs().amax(-1, keepdim=True)
    assert ((y.double() - exact).abs() <= tolerance).all()


@pytest.mark.parametrize("bits,n,k", CASES)
def test_dequantized_matrix_is_exact(kernel, bits, n, k):
    packed, scale, exact = matrix(n, k, bits=bits)
    expected = exact.float()  # (int8: code x scale rounded once to fp32, as the kernel does)
    assert torch.equal(kernel.dequantize(packed, n, k, torch.float32, scale=scale), expected)
    assert torch.equal(kernel.dequantize(packed, n, k, torch.float32, (2, 6), scale=scale), expected[2:6])
    assert torch.equal(kernel.dequantize(packed, n, k, torch.bfloat16, scale=scale), expected.bfloat16())


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_a_row_is_the_same_in_any_batch(kernel, bits):
    """Rows go through the kernel 4 at a time; each output is made by the same operations whatever
    its neighbours, so a seeded request decodes alike alone or batched."""
    packed, scale, _ = matrix(64, 256, bits=bits)
    x = torch.randn(9, 256)
    together = kernel.linear(x, packed, 64, scale)
    for rows in (1, 2, 3, 4, 5, 9):
        assert torch.equal(kernel.linear(x[:rows], packed, 64, scale), together[:rows])
    alone = torch.cat([kernel.linear(x[i:i + 1], packed, 64, scale) for i in range(9)])
    assert torch.equal(alone, together)


def test_int8_layer_cast_to_bf16_still_multiplies(kernel):
    """``.to(torch.bfloat16)`` turns the row scales to bf16 too; the kernel takes fp32 scales, so the
    layer hands it converted ones (read as fp32, bf16 scales were garbage)."""
    torch.manual_seed(0)
    layer = InferenceLinear(torch.randn(64, 128), None, "int8", torch.float32)
    x = torch.randn(1, 128)
    before = layer(x)
    layer.to(torch.bfloat16)
    after = layer(x.bfloat16()).float()
    assert layer.scale.dtype == torch.bfloat16
    assert (after - before).abs().max() <= 0.02 * before.abs().max()


AVX2_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_quant_kernel import CASES, matrix
from havoc_core import quant_kernel
kernel = quant_kernel.load()
assert kernel.isa == "avx2", kernel
torch.manual_seed(1)
torch.save([kernel.linear(torch.randn(6, k), m[0], n, m[1]) for b, n, k in CASES for m in [matrix(n, k, bits=b)]],
           sys.argv[2])
"""


def test_avx2_build_gives_the_same_bits(kernel, tmp_path):
    """The AVX2 build (pair sums of 8-bit products, 8 lanes) and the AVX-512 VNNI one (16 lanes) make
    each output with the same float operations in the same order, int4 and int8."""
    out = tmp_path / "avx2.pt"
    done = subprocess.run([sys.executable, "-c", AVX2_RUN, os.path.dirname(__file__), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **AVX2_EMULATION})
    assert done.returncode == 0, done.stderr
    torch.manual_seed(1)
    here = [kernel.linear(torch.randn(6, k), m[0], n, m[1]) for b, n, k in CASES for m in [matrix(n, k, bits=b)]]
    assert all(torch.equal(a, b) for a, b in zip(torch.load(out), here, strict=True))


def operator_kernel() -> str:
    """Where havoc::quant_linear's CPU kernel was registered from (the dispatcher's own record)."""
    return next(line for line in torch._C._dispatch_dump("havoc::quant_linear").splitlines() if line.startswith("CPU"))


@pytest.mark.parametrize(("bits", "n", "k"), CASES)
def test_operator_gives_the_kernels_bits(kernel, bits, n, k):
    """havoc::quant_linear, what a compiled step calls, runs quant_op.cpp where a C++ compiler exists
    and gives the ctypes kernel's bits: fp32, bf16 and other dtypes, any leading shape, strided rows."""
    if shutil.which("c++") or shutil.which("g++"):
        assert "quant_op.cpp" in operator_kernel()
    packed, scale, _ = matrix(n, k, bits=bits)
    torch.manual_seed(2)
    for x in (torch.randn(1, 1, k), torch.randn(5, k).bfloat16(), torch.randn(2, 3, k).half(), torch.randn(k, 3).t()):
        y = quant_kernel.compiled_linear(x, packed, scale, n)
        assert y.shape == (*x.shape[:-1], n) and torch.equal(y, kernel.linear(x, packed, n, scale))


OPERATOR_FALLBACK_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_quant_kernel import matrix, operator_kernel
from havoc_core import quant_kernel
kernel = quant_kernel.load()
packed, scale, _ = matrix(64, 256, bits="int8")
x = torch.randn(2, 256)
assert torch.equal(quant_kernel.compiled_linear(x, packed, scale, 64), kernel.linear(x, packed, 64, scale))
print(operator_kernel())
"""


def test_without_a_cpp_compiler_the_operator_runs_python(kernel, tmp_path):
    """The C kernel builds without a C++ compiler; the operator then runs the ctypes kernel, silently."""
    done = subprocess.run([sys.executable, "-c", OPERATOR_FALLBACK_RUN, os.path.dirname(__file__)], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "CXX": str(tmp_path / "no-such-c++"), "HAVOC_KERNEL_CACHE": str(tmp_path)})
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "quant_kernel.py" in done.stdout and "quant_op.cpp" not in done.stdout, done.stdout
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.so")] == ["quant_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_compiled_decode_equals_eager(kernel, model, tok, prompt_ids, quantize):
    """Under torch.compile each kernel is one custom operator: a chat's decode step (one slot; a
    batching engine takes fbgemm's int8 kernel) compiles whole, twice at most, with the same results."""
    fast = prepare_model(copy.deepcopy(model), torch.float32, quantize)
    prompts = [prompt_ids("The import statement"), prompt_ids("x")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    eager = Engine(fast, tok, max_batch=1).generate(prompts, greedy)
    counters.clear()
    compiled = Engine(fast, tok, max_batch=1, compile=True).generate(prompts, greedy)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # at most one graph for the first step's shapes and one with the position symbolic, not one a position
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert [c.ids for c in compiled] == [e.ids for e in eager]


FALLBACK_RUN = """
import torch
from havoc_core import quant_kernel
from havoc_core.inference import InferenceLinear
layer = InferenceLinear(torch.randn(64, 128) * 0.02, None, "int4", torch.bfloat16)
assert layer.int4[1] is not None  # ATen's layout and its scales
x = torch.randn(3, 128).bfloat16()
print(float((layer(x).float() - x.float() @ (layer(torch.eye(128).bfloat16()).float())).abs().max()))
layer = InferenceLinear(torch.randn(64, 128), None, "int8", torch.float32)
x = torch.randn(1, 128)
assert not layer._own_ready()  # fbgemm's kernel
exact = x @ (layer.weight.float() * layer.scale[:, None]).t()
print(float((layer(x) - exact).abs().max() / exact.abs().max()))
"""


def test_without_a_compiler_aten_runs_with_a_note(tmp_path):
    done = subprocess.run([sys.executable, "-c", FALLBACK_RUN], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"), "HAVOC_KERNEL_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    int4_error, int8_error = map(float, done.stdout.split())
    assert int4_error < 0.05 and int8_error < 0.05  # ATen's int4 product, fbgemm's int8 one (relative)
    if kernel_isa() is not None:
        note = [line for line in done.stderr.splitlines() if "kernel" in line]
        assert len(note) == 1 and note[0].startswith("note: quantized products: own kernel not built"), done.stderr
        assert "no-such-cc" in note[0] and "ATen's int4pack and fbgemm's int8 kernels run instead" in note[0]
