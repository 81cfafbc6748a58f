"""HAVOC's own int4 and int8 products for x86 CPUs (``quant_kernel.c``), built on first use with the
system's C compiler and cached; ATen's int4pack and fbgemm's int8 kernels stay where it cannot be built.

Why kernels of our own (issue 18, docs/LOG.md 2026-12-06): ATen's ``_weight_int4pack_mm_for_cpu``
is compute-bound at ~9 GB/s of codes per core, ``_dyn_quant_matmul_4bit`` is a reference loop on
x86 and torchao ships no x86 kernels, so no well-kept kernel comes near llama.cpp's Q4_0; fbgemm's
int8 product is fast but opaque to ``torch.compile`` (a graph break per product). These work as
llama.cpp's do: each group of 32 activations is rounded to int8 with its own scale, so a group's
product is an exact integer dot product of 4- or 8-bit codes and 8-bit values (AVX-512 VNNI, or
AVX2's pair sums), scaled once in fp32.

- Layouts (made at load time from the stored parts, never stored): output rows in tiles of 4,
  inputs in blocks of 128 (4 groups of 32); a vector lane of 4 bytes holds 4 inputs of one group
  of one row (lane 4 i + r: group i, row r), so each lane's integer dot products add up to the
  whole group's with no shuffles between rows (from L1: 1.25x (int4) and 1.5x (int8) the blocks
  per second of transposing the sums; docs/LOG.md). int4, 320 bytes per tile and block: 4
  registers of 64 bytes, byte b of lane l of register j holding input 4 j + b in its low nibble and
  16 + 4 j + b in its high one; then per lane the bf16 scale and the bf16 zero. int8, 512 bytes: 8
  such registers, byte b of register j holding input 4 j + b as code + 128; one fp32 scale per row
  beside them.
- The AVX-512 and AVX2 builds make every output with the same float operations in the same order,
  so logits are bit-identical on both CPU kinds, and a row's result is the same in any batch.
- The products are one torch operator (``compiled_linear``), whole to ``torch.compile``. Its CPU
  kernel is C++ (``quant_op.cpp``, on torch's stable ABI, built with the C kernel in ~2 s) where a
  C++ compiler exists: a compiled step then calls the C code with no Python in between (havoc-small
  int4 step 3.5-3.9 -> 3.0-3.2 ms, int8 4.7 -> 3.8). Elsewhere the ctypes kernel serves it.
- Up to ``KERNEL_ROWS`` rows per call (decode steps) run in the kernel, reading the codes once;
  longer calls (prefills) dequantize ``MATMUL_ROWS`` matrix rows at a time for a float matmul:
  compute-bound work the CPU's matmul units do faster (2.2-2.5x ATen's int4 kernel on a 512-token
  prefill).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from havoc_core.atomic import atomic_path
from havoc_core.precision import kernel_isa

SOURCE = Path(__file__).with_name("quant_kernel.c")
OP_SOURCE = Path(__file__).with_name("quant_op.cpp")  # the operator's C++ kernel, built with SOURCE
KERNEL_ROWS = 64  # calls with more rows than this dequantize and run a float matmul (docs/LOG.md)
MATMUL_ROWS = 512  # matrix rows dequantized per float matmul (a slice of a few MB, in cache)
FLAGS = {"avx512-vnni": ["-DHAVOC_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"],
         "avx2": ["-mavx2", "-mfma"]}
_TILE, _BLOCK_BYTES = 4, 320


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("HAVOC_KERNEL_CACHE") or Path(root) / "havoc" / "kernels")


class Kernel:
    """The built library of one ISA, called through ctypes (which releases the GIL). Kept to a few
    Python calls per product: a havoc-small decode step makes 49 of them."""

    def __init__(self, path: Path, isa: str) -> None:
        self.isa = isa
        lib = ctypes.CDLL(str(path))
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._int4 = lib.havoc_int4_linear
        self._int4.argtypes = [ptr, c_int, i64, i64, ptr, i64, ptr, c_int, c_int]
        self._int4.restype = c_int
        self._int8 = lib.havoc_int8_linear
        self._int8.argtypes = [ptr, c_int, i64, i64, ptr, ptr, i64, ptr, c_int, c_int]
        self._int8.restype = c_int
        self._int4_dequantize = lib.havoc_int4_dequantize
        self._int4_dequantize.argtypes = [ptr, i64, i64, i64, ptr, c_int, c_int]
        self._int4_dequantize.restype = None
        self._int8_dequantize = lib.havoc_int8_dequantize
        self._int8_dequantize.argtypes = [ptr, ptr, i64, i64, i64, ptr, c_int, c_int]
        self._int8_dequantize.restype = None

    def linear(self, x: Tensor, packed: Tensor, n: int, scale: Tensor | None = None) -> Tensor:
        """x [..., K] (fp32 or bf16; other dtypes compute in fp32) times the matrix in ``packed``:
        [..., n]. int4 (``int4_layout``), or int8 (``int8_layout``) with its fp32 row ``scale``."""
        if x.dtype is not torch.bfloat16 and x.dtype is not torch.float32:
            x = x.float()
        x = x.contiguous()
        k = x.shape[-1]
        y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        half, threads = x.dtype is torch.bfloat16, torch.get_num_threads()
        if scale is None:
            failed = self._int4(x.data_ptr(), half, x.numel() // k, k, packed.data_ptr(), n, y.data_ptr(), half,
                                threads)
        else:
            failed = self._int8(x.data_ptr(), half, x.numel() // k, k, packed.data_ptr(), scale.data_ptr(), n,
                                y.data_ptr(), half, threads)
        if failed:
            raise MemoryError(f"quant_kernel: no memory for {x.numel() // k} rows of {k} activations")
        return y

    def dequantize(self, packed: Tensor, n: int, k: int, dtype: torch.dtype, rows: tuple[int, int] | None = None,
                   out: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """The float matrix [n, k] in ``dtype`` (fp32 or bf16), or its ``rows`` (start, stop), into ``out``
        (int8 where ``scale`` is given, as for ``linear``)."""
        start, stop = rows or (0, n)
        assert 0 <= start <= stop <= n, f"rows {start}..{stop} of {n}"
        dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = torch.empty(stop - start, k, dtype=dtype) if out is None else out
        assert out.dtype == dtype and out.is_contiguous() and out.numel() >= (stop - start) * k
        half, threads = dtype == torch.bfloat16, torch.get_num_threads()
        if scale is None:
            self._int4_dequantize(packed.data_ptr(), k, start, stop, out.data_ptr(), half, threads)
        else:
            self._int8_dequantize(packed.data_ptr(), scale.data_ptr(), k, start, stop, out.data_ptr(), half, threads)
        return out[: stop - start]

    def matmul(self, x: Tensor, packed: Tensor, n: int, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
        """x [..., K] times the matrix, as a ``dtype`` float matmul over slices of ``MATMUL_ROWS``
        dequantized rows (each in cache for its product; a whole 70 MB matrix took longer to
        allocate, page by page, than to multiply). Output in ``dtype``."""
        k = x.shape[-1]
        rows = x.reshape(-1, k).to(dtype)
        y = torch.empty(rows.shape[0], n, dtype=dtype)
        buffer = torch.empty(min(n, MATMUL_ROWS), k, dtype=dtype)
        for start in range(0, n, MATMUL_ROWS):
            stop = min(start + MATMUL_ROWS, n)
            y[:, start:stop] = F.linear(rows, self.dequantize(packed, n, k, dtype, (start, stop), buffer, scale))
        return y.view(*x.shape[:-1], n)


def build(isa: str, op: bool = False) -> Path:
    """The library for ``isa``, compiled once into ``cache_dir()`` (keyed by sources and flags): the
    C kernel, or with ``op`` the operator's C++ kernel and the C one, linked to this torch."""
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", *FLAGS[isa]]
    source = SOURCE.read_bytes()
    if op:
        torch_dir = Path(torch.__file__).parent
        flags += [f"-I{torch_dir / 'include'}", f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}"]
        source += OP_SOURCE.read_bytes() + torch.__version__.encode()
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    path = cache_dir() / f"{'quant_op' if op else 'quant_kernel'}-{isa}-{key}.so"
    if path.is_file():
        return path
    if op:
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        sources = [str(OP_SOURCE), "-x", "c", str(SOURCE), "-x", "none", "-ltorch_cpu", "-lc10"]
    else:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        sources = [str(SOURCE)]
    if not compiler:
        raise OSError("no C++ compiler (c++ or g++, or $CXX)" if op else "no C compiler (cc or gcc, or $CC)")
    with atomic_path(path) as tmp:
        done = subprocess.run([compiler, *flags, *sources, "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return path


@functools.cache
def load() -> Kernel | str:
    """The kernel for this CPU, or why ATen's runs instead (one line, for the printed plan)."""
    isa = kernel_isa()
    if isa is None:
        return "no build for this CPU (or HAVOC_OWN_KERNELS=0)"
    try:
        kernel = Kernel(build(isa), isa)
    except (OSError, subprocess.SubprocessError) as e:
        reason = f"own kernel not built ({e})"
        print(f"note: quantized products: {reason}; ATen's int4pack and fbgemm's int8 kernels run instead (slower)",
              file=sys.stderr)
        return reason
    try:  # the operator's kernel: C++ where it builds (no Python in a compiled step), else ``_linear``
        torch.ops.load_library(build(isa, op=True))
    except (OSError, subprocess.SubprocessError, RuntimeError):
        _LIBRARY.impl("quant_linear", _linear, "CPU")
    return kernel


def int4_layout(qweight: Tensor, qscale: Tensor) -> Tensor:
    """The kernel's layout (module docstring) of a stored int4 matrix: ``qweight`` uint8 [N, K / 2],
    ``qscale`` bf16 [K / 32, N, 2] (``quantized.quantize_matrix``). Rows and groups are padded with
    zero codes and zero scales to whole tiles and blocks: they add exactly nothing."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    groups = k // 32
    pad_groups, pad_rows = -groups % 4, -n % _TILE
    tiles, blocks = (n + pad_rows) // _TILE, (groups + pad_groups) // 4
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(n, groups, 32)
    codes = F.pad(codes, (0, 0, 0, pad_groups, 0, pad_rows)).view(tiles, _TILE, blocks, 4, 2, 4, 4)
    codes = codes[..., 0, :, :] | (codes[..., 1, :, :] << 4)  # inputs 4 j + b and 16 + 4 j + b in one byte
    codes = codes.permute(0, 2, 4, 3, 1, 5).reshape(tiles, blocks, 4 * 64)  # register j, lane 4 i + r, byte b
    scales = F.pad(qscale.to(torch.bfloat16).permute(1, 0, 2), (0, 0, 0, pad_groups, 0, pad_rows))
    scales = scales.view(tiles, _TILE, blocks, 4, 2).permute(0, 2, 3, 1, 4).reshape(tiles, blocks, 32)
    packed = torch.cat([codes, scales.contiguous().view(torch.uint8)], -1).contiguous()
    assert packed.shape[-1] == _BLOCK_BYTES
    return packed


def int8_layout(weight: Tensor) -> Tensor:
    """The kernel's layout (module docstring) of a stored int8 matrix ``weight`` [N, K] (its scale
    stays as stored): zero codes pad rows and inputs to whole tiles and blocks."""
    n, k = weight.shape
    w = F.pad(weight.view(torch.uint8), (0, -k % 128, 0, -n % _TILE))
    tiles, blocks = w.shape[0] // _TILE, w.shape[1] // 128
    w = w.view(tiles, _TILE, blocks, 4, 8, 4).permute(0, 2, 4, 3, 1, 5)  # register j, lane 4 i + r, byte b
    return (w.reshape(tiles, blocks, 512) ^ 0x80).contiguous()  # code + 128: unsigned, for VNNI


def int8_layout_nbytes(n: int, k: int) -> int:
    """The size of ``int8_layout`` of an [n, k] matrix, without making it."""
    return -(-n // _TILE) * -(-k // 128) * 512


def _linear(x: Tensor, packed: Tensor, scale: Tensor | None, n: int) -> Tensor:
    kernel = load()
    assert isinstance(kernel, Kernel)
    return kernel.linear(x, packed, n, scale)


def _output(x: Tensor, packed: Tensor, scale: Tensor | None, n: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], n, dtype=x.dtype if x.dtype in (torch.float32, torch.bfloat16)
                       else torch.float32)


# ``Kernel.linear`` as an operator ``torch.compile`` keeps whole (eager calls skip the dispatcher).
# Defined with ``torch.library.Library`` rather than ``custom_op``: 4 us less a call inside a compiled
# step (no autograd wrapping), 0.2 ms of a havoc-small step (docs/LOG.md). Its CPU kernel is
# registered by ``load``: quant_op.cpp, or ``_linear`` where that cannot be built.
_LIBRARY = torch.library.Library("havoc", "DEF")
_LIBRARY.define("quant_linear(Tensor x, Tensor packed, Tensor? scale, int n) -> Tensor")
torch.library.register_fake("havoc::quant_linear", _output, lib=_LIBRARY)
compiled_linear = torch.ops.havoc.quant_linear.default
