"""The one dtype policy: which device, storage dtype and compute dtype each phase runs in.

Chat, generate, serve, the engine and training all ask here, and the answer depends on what the
machine can do, measured or queried, never on a model's name. The facts behind each choice are in
docs/LOG.md; in short, on CPU:
- native bf16 (AVX512-BF16/AMX) makes bf16 matmuls ~2x fp32's rate: bf16 everywhere;
- without it, bf16 matmuls are emulated and several times slower than fp32: compute-bound work
  (prefill, training) runs fp32, memory-bound decoding stores bf16 only where the bytes dominate
  (from ~50M parameters), and int8 matrices take fp32 activations (fbgemm's kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from havoc_core.errors import HavocError

Quantize = Literal["int8", "int4"]
QUANTIZE = ("int8", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_DECODE_FROM = 50_000_000  # parameters from which bf16 storage pays off on CPUs without native bf16
# A prepacked copy of the matrices (oneDNN's blocked layout) speeds up batched decode steps 1.3-1.7x;
# a single fp32 stream gains ~10-20%, worth the second copy of the weights on small models only.
PACK_FP32_SINGLE_BELOW = 50_000_000


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(device: str) -> str:
    """``auto``: the first CUDA GPU if there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HavocError(f"dtype: expected auto or one of {', '.join(DTYPES)}, found {name!r}")
    return DTYPES[name]


def weights_dtype(dtype: str, n_params: int, device: str, quantize: Quantize | None = None) -> torch.dtype:
    """Storage dtype for inference. ``auto``: bf16 on GPUs and on CPUs with native bf16 (havoc-tiny
    decodes 1.5-2.5x faster than in fp32 there); on other CPUs bf16 from ``BF16_DECODE_FROM``
    parameters (decode reads half the bytes) and fp32 below (small models are bound by per-op
    overhead, not memory); fp32 beside int8 matrices (the CPU int8 kernel takes fp32 activations),
    bf16 beside int4 ones (ATen's int4 kernel is several times faster on bf16 activations than fp32)."""
    if dtype != "auto":
        return parse_dtype(dtype)
    if quantize == "int4":
        return torch.bfloat16
    if device.startswith("cpu"):
        if quantize:
            return torch.float32
        return torch.bfloat16 if n_params >= BF16_DECODE_FROM or cpu_has_native_bf16() else torch.float32
    return torch.bfloat16


def prefill_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The prefill is compute-bound: the weights' own dtype on accelerators and on CPUs with native
    bf16, fp32 on other CPUs, where bf16 matmuls are many times slower than fp32."""
    if device.type != "cpu" or weights == torch.float32:
        return weights
    return torch.bfloat16 if weights == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def training_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The matmul dtype of training: ``auto`` is bf16 autocast on CUDA and on CPUs with native bf16
    (1.6x the fp32 training tokens/s on havoc-tiny and havoc-small here), else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return parse_dtype(dtype)


def should_pack(weights: torch.dtype, n_params: int, device: str, batching: bool) -> bool:
    """Whether to keep a oneDNN-prepacked copy of the float matrices (CPU only): when batching,
    and for small fp32 models (see ``PACK_FP32_SINGLE_BELOW``)."""
    if not device.startswith("cpu"):
        return False
    return batching or (weights == torch.float32 and n_params < PACK_FP32_SINGLE_BELOW)


@dataclass(frozen=True)
class InferencePlan:
    """Every dtype/kernel choice for running one model, decided once, printed at start."""

    device: str
    weights: torch.dtype
    quantize: Quantize | None
    pack: bool

    @property
    def prefill(self) -> torch.dtype:
        return prefill_dtype(self.weights, torch.device(self.device))

    def describe(self) -> str:
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        kernels = {"int8": "int8 (fbgemm)", "int4": "int4 (ATen int4pack)"}
        matrices = kernels.get(self.quantize or "", name[self.weights])
        packed = ", prepacked weights (oneDNN)" if self.pack else ""
        return f"{self.device}: weights {matrices}, prefill {name[self.prefill]}{packed}"


def plan_inference(n_params: int, *, device: str = "auto", dtype: str = "auto", quantize: Quantize | None = None,
                   batching: bool = False, pack: bool | None = None) -> InferencePlan:
    """The plan for a model of ``n_params`` parameters; explicit arguments win over ``auto``."""
    if quantize not in (None, *QUANTIZE):
        raise HavocError(f"quantize: expected {' or '.join(QUANTIZE)} or nothing, found {quantize!r}")
    device = pick_device(device)
    if quantize == "int4" and not device.startswith("cpu"):
        raise HavocError(f"quantize: int4 runs on the CPU only (ATen's int4pack CPU kernel), found device {device}; "
                         "use int8 or bf16 there")
    weights = weights_dtype(dtype, n_params, device, quantize)
    if pack is None:
        pack = should_pack(weights, n_params, device, batching)
    return InferencePlan(device, weights, quantize, pack and device.startswith("cpu"))
