"""The one dtype policy: which device, storage dtype and compute dtype each phase runs in.

Chat, generate, serve, the engine and training all ask here, and the answer depends on what the
machine can do, measured or queried, never on a model's name. The facts behind each choice are in
docs/LOG.md; in short, on CPU:
- native bf16 (AVX512-BF16/AMX) makes bf16 matmuls ~2x fp32's rate: bf16 for chat and training;
- without it, bf16 matmuls are emulated and several times slower than fp32: compute-bound work
  (prefill, training) runs fp32, memory-bound decoding stores bf16 only where the bytes dominate
  (from ~50M parameters);
- a batching server stores int8 on every CPU (fbgemm's kernel, fp32 activations): 5x packed fp32's
  8-row products without native bf16, and 1.3x packed bf16's batched steps with it.
The CPU is described by ``CpuInfo`` (what torch runs on: ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` lower it), so the policy can be checked on CPUs this machine is not.
``AVX2_EMULATION`` makes an AVX-512 machine run every kernel library torch uses as on an AVX2 CPU
without native bf16 (fbgemm reads its own variable: without it, int8 runs AVX-512 VNNI kernels).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from havoc_core.errors import HavocError

Quantize = Literal["int8", "int4"]
QUANTIZE = ("int8", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_DECODE_FROM = 50_000_000  # parameters from which bf16 storage pays off on CPUs without native bf16
# A prepacked copy of the matrices (oneDNN's blocked layout) speeds up batched decode steps 1.3-1.7x;
# a single fp32 stream gains ~10-20%, worth the second copy of the weights on small models only.
PACK_FP32_SINGLE_BELOW = 50_000_000
# (and an Inductor on-disk cache of its own: with the one all of a user's runs share, compiled int4
# steps under the emulation gave NaN activations now and then, with HAVOC's kernel replaced by a
# plain matmul too; with a fresh directory never: docs/LOG.md 2026-12-06, third session)
AVX2_EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                  "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / f"torchinductor_avx2_{os.getuid()}")}


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class CpuInfo:
    """What the policy asks of a CPU. ``CpuInfo.detect()`` reads this machine (also what
    ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` leave of it); tests describe other CPUs."""

    capability: str  # ATen's kernel set: "AVX512", "AVX2", "DEFAULT" (or another architecture's name)
    native_bf16: bool  # oneDNN runs bf16 matmuls natively (AVX512-BF16, AMX): ~2x fp32's rate
    vnni: bool = False  # AVX-512 VNNI: 8-bit dot products (the int4 kernel's AVX-512 build)

    @staticmethod
    @functools.cache
    def detect() -> CpuInfo:
        return CpuInfo(torch.backends.cpu.get_cpu_capability(), cpu_has_native_bf16(),
                       {"avx512bw", "avx512_vnni"} <= cpu_flags())

    def __str__(self) -> str:
        return f"{self.capability}, {'native' if self.native_bf16 else 'no native'} bf16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def kernel_isa(cpu: CpuInfo | None = None) -> str | None:
    """Which build of HAVOC's int4/int8 kernels (``quant_kernel``) a CPU runs: "avx512-vnni" where torch
    runs AVX-512 kernels on a CPU with VNNI, "avx2" where it runs AVX2 ones (also on an AVX-512 CPU
    lowered by ``ATEN_CPU_CAPABILITY=avx2``), else None: ATen's int4pack and fbgemm's int8 kernels.
    ``HAVOC_OWN_KERNELS=0`` picks those anywhere (to compare them)."""
    cpu = cpu or CpuInfo.detect()
    if os.environ.get("HAVOC_OWN_KERNELS") == "0":
        return None
    if cpu.capability == "AVX512" and cpu.vnni:
        return "avx512-vnni"
    return "avx2" if cpu.capability in ("AVX512", "AVX2") else None


def pick_device(device: str) -> str:
    """``auto``: the first CUDA GPU if there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HavocError(f"dtype: expected auto or one of {', '.join(DTYPES)}, found {name!r}")
    return DTYPES[name]


def weights_dtype(dtype: str, n_params: int, device: str, quantize: Quantize | None = None, *,
                  cpu: CpuInfo | None = None) -> torch.dtype:
    """Storage dtype for inference. ``auto``: bf16 on GPUs and on CPUs with native bf16 (havoc-tiny
    decodes 1.5-2.5x faster than in fp32 there); on other CPUs bf16 from ``BF16_DECODE_FROM``
    parameters (decode reads half the bytes) and fp32 below (small models are bound by per-op
    overhead, not memory); fp32 beside int8 matrices (the CPU int8 kernel takes fp32 activations)
    and beside int4 ones where HAVOC's int4 kernel runs (a havoc-small step 9.1 ms against 11.3 with
    bf16 beside them and 9.9 with bf16 storage and fp32 activations, docs/LOG.md); bf16 beside
    ATen's int4 kernel (several times faster on bf16 activations than on fp32 ones)."""
    if dtype != "auto":
        return parse_dtype(dtype)
    if not device.startswith("cpu"):
        return torch.bfloat16
    if quantize == "int4":
        return torch.float32 if kernel_isa(cpu) else torch.bfloat16
    if quantize:
        return torch.float32
    return torch.bfloat16 if n_params >= BF16_DECODE_FROM or (cpu or CpuInfo.detect()).native_bf16 else torch.float32


def serving_quantize(dtype: str, device: str, cpu: CpuInfo | None = None) -> Quantize | None:
    """int8 for a batching server on a CPU when neither --dtype nor --quantize is given, for -0.1%
    perplexity on the demo model. Measured without native bf16 (AVX2, havoc-small's matrices, 8 rows):
    fbgemm's int8 0.17 ms, packed fp32 0.96 ms, emulated bf16 2.33 ms. With native bf16 (AVX-512 +
    AMX, havoc-small, 2026-12-06): batch-8 decode int8 457 tok/s against packed bf16's 357, 8 served
    clients 237 against 209 tokens/s, one client 54 against 33, time to first token 171 against
    201 ms (docs/LOG.md). So int8 on every CPU; --dtype bfloat16 keeps the checkpoint's bf16."""
    if dtype != "auto" or not device.startswith("cpu"):
        return None
    return "int8"


def prefill_dtype(weights: torch.dtype, device: torch.device, cpu: CpuInfo | None = None) -> torch.dtype:
    """The prefill is compute-bound: the weights' own dtype on accelerators and on CPUs with native
    bf16, fp32 on other CPUs, where bf16 matmuls are many times slower than fp32."""
    if device.type != "cpu" or weights == torch.float32:
        return weights
    native = (cpu or CpuInfo.detect()).native_bf16
    return torch.bfloat16 if weights == torch.bfloat16 and native else torch.float32


def training_dtype(dtype: str, device: torch.device, cpu: CpuInfo | None = None) -> torch.dtype:
    """The matmul dtype of training: ``auto`` is bf16 autocast on CUDA and on CPUs with native bf16
    (1.6x the fp32 training tokens/s on havoc-tiny and havoc-small here), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if (cpu or CpuInfo.detect()).native_bf16 else torch.float32
    return parse_dtype(dtype)


def should_pack(weights: torch.dtype, n_params: int, device: str, batching: bool, cpu: CpuInfo | None = None) -> bool:
    """Whether to keep a oneDNN-prepacked copy of the float matrices (CPU only): when batching, and
    for small fp32 models (see ``PACK_FP32_SINGLE_BELOW``). bf16 matrices pack only where the CPU
    has native bf16 (oneDNN has no packed emulated-bf16 path worth its copy)."""
    if not device.startswith("cpu"):
        return False
    if weights == torch.bfloat16 and not (cpu or CpuInfo.detect()).native_bf16:
        return False
    return batching or (weights == torch.float32 and n_params < PACK_FP32_SINGLE_BELOW)


def compile_decode(model: torch.nn.Module, one_slot_cpu: bool) -> Callable[..., Any]:
    """The torch.compile of a decode step. A CPU chat (one slot) compiles for its own shapes (the
    position alone turns symbolic, at the second compile) with Inductor's C++ wrapper calling the
    kernels: a havoc-small int4 step took 3.3-3.7 ms, against 4.0-4.1 with every shape symbolic and
    Python calling each kernel (docs/LOG.md, 2026-12-06 fifth session). Batching engines keep every
    shape symbolic: their number of rows changes from step to step."""
    if one_slot_cpu:
        return torch.compile(model, options={"cpp_wrapper": True})
    return torch.compile(model, dynamic=True)


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class InferencePlan:
    """Every dtype/kernel choice for running one model, decided once, printed at start."""

    device: str
    weights: torch.dtype
    quantize: Quantize | None
    pack: bool
    batching: bool = False
    cpu: CpuInfo | None = None  # the CPU it was planned for (None off the CPU)

    @property
    def prefill(self) -> torch.dtype:
        return prefill_dtype(self.weights, torch.device(self.device), self.cpu)

    def kernels(self, rows: int) -> str:
        """The matmul of a decode step of ``rows`` rows, as the engine runs it (``InferenceLinear``)."""
        if self.quantize == "int4":
            isa = kernel_isa(self.cpu)
            return f"int4 (HAVOC {isa})" if isa else "int4 (ATen int4pack)"
        if self.quantize == "int8":
            if not self.device.startswith("cpu"):
                return "int8 (dequantised)"
            isa = kernel_isa(self.cpu)  # (batching engines: fbgemm's, 1.2-3x faster on several rows)
            return f"int8 (HAVOC {isa})" if isa and not self.batching else "int8 (fbgemm)"
        name = NAMES[self.weights]
        if not self.device.startswith("cpu"):
            return name
        if rows == 1 and not self.batching and self.weights != torch.float32:
            return f"{name} (ATen)"  # a one-slot engine's half-precision rows: engine.slot_kernels
        if self.pack:
            return f"{name} packed (oneDNN)"
        return "fp32 (MKL)" if self.weights == torch.float32 else f"{name} (oneDNN)"

    def describe(self) -> str:
        """E.g. "cpu (AVX2, no native bf16): decode int8 (fbgemm), batch int8 (fbgemm), prefill fp32"."""
        where = f"{self.device} ({self.cpu})" if self.cpu else self.device
        batch = f", batch {self.kernels(8)}" if self.batching else ""
        prefill = NAMES[self.prefill]
        own = self.quantize == "int4" or (self.quantize == "int8" and not self.batching)
        if own and kernel_isa(self.cpu) and self.cpu and self.cpu.native_bf16:
            prefill = f"bf16 ({self.quantize} dequantized)"  # quant_kernel: a float matmul, in the CPU's fastest dtype
        return f"{where}: decode {self.kernels(1)}{batch}, prefill {prefill}"


def plan_inference(n_params: int, *, device: str = "auto", dtype: str = "auto", quantize: Quantize | None = None,
                   batching: bool = False, pack: bool | None = None, cpu: CpuInfo | None = None) -> InferencePlan:
    """The plan for a model of ``n_params`` parameters on ``cpu`` (default: this machine's);
    explicit arguments (the commands' --dtype, --quantize, --no-prepack) win over ``auto``."""
    if quantize not in (None, *QUANTIZE):
        raise HavocError(f"quantize: expected {' or '.join(QUANTIZE)} or nothing, found {quantize!r}")
    device = pick_device(device)
    on_cpu = device.startswith("cpu")
    if quantize == "int4" and not on_cpu:
        raise HavocError(f"quantize: int4 runs on the CPU only (ATen's int4pack CPU kernel), found device {device}; "
                         "use int8 or bf16 there")
    cpu = (cpu or CpuInfo.detect()) if on_cpu else None
    if batching and quantize is None:
        quantize = serving_quantize(dtype, device, cpu)
    weights = weights_dtype(dtype, n_params, device, quantize, cpu=cpu)
    if quantize:
        pack = False  # quantized matrices keep their own kernels' layouts
    elif pack is None:
        pack = should_pack(weights, n_params, device, batching, cpu)
    return InferencePlan(device, weights, quantize, pack and on_cpu, batching, cpu)
