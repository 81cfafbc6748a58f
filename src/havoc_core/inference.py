"""Models prepared for inference: fused, frozen matrices in their storage dtype (bf16/fp16/fp32 or
int8), optionally prepacked for oneDNN on CPU, and loading a checkpoint that way.

Each phase computes in the dtype ``precision`` picks: a prefill may upcast (dequantise) matrices on
the fly, a decode step reads each stored weight once, in the stored dtype.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from havoc_core import integrity
from havoc_core.attention import Attention
from havoc_core.checkpoint import OPTIMIZER_FILE, find_checkpoint, load_config, resolve_checkpoint
from havoc_core.errors import HavocError
from havoc_core.mlp import GatedMLP
from havoc_core.model import HavocModel, load_model
from havoc_core.precision import QUANTIZE, InferencePlan, Quantize, cpu_has_native_bf16, plan_inference
from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer

INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)  # int4 ranges tried per group (clipping outliers can pay)


class InferenceLinear(nn.Module):
    """A frozen linear layer stored for decoding: its weight in bf16/fp16/fp32, int8 with one
    scale per output row, or int4 in groups of ``INT4_GROUP`` inputs with a scale and a zero each.
    It computes in the activations' dtype: a prefill upcasts (dequantises) the weight on the fly, a
    decode step reads the stored bytes once.

    Kernels on CPU, by what measured fastest here (docs/LOG.md):
    - one row of half-precision activations: ``F.linear``, which the engine runs on ATen's own
      kernel (``engine.single_row_kernels``): up to 2.5x oneDNN's rate on small matrices;
    - int8, up to ``DECODE_ROWS`` rows: fbgemm's int8 kernel, which also rounds the step's
      activations to 8 bits (per tensor, on the fly): integer dot products make int8 faster than
      bf16 on a CPU without native bf16; the prefill stays weight-only;
    - several rows (and single fp32 rows), after ``pack()``: oneDNN on a copy of the weight in its
      blocked layout."""

    DECODE_ROWS = 16  # up to this many rows (a decode step of a batch) take the int8 kernel
    INT4_GROUP = 32  # inputs sharing one int4 scale and zero (as llama.cpp's Q4_0 blocks)

    def __init__(self, weight: Tensor, bias: Tensor | None, quantize: Quantize | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or weight.dtype
        scale = None
        self.int4: tuple[Tensor, Tensor] | None = None  # (packed weight, scales and zeros) for int4
        if quantize == "int4" and weight.shape[1] % self.INT4_GROUP == 0:
            self.int4 = _int4_pack(weight.detach(), self.INT4_GROUP)
            weight = torch.empty(0, dtype=dtype, device=weight.device)
        elif quantize in ("int8", "int4"):  # int4 needs whole groups: such a matrix is int8 instead
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            weight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        # buffers, so that model.to(device) moves them
        self.register_buffer("weight", weight.detach() if scale is not None else weight.detach().to(dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self._fbgemm: Any = None  # fbgemm's layout of an int8 weight, made on first CPU use
        self._onednn: Tensor | None = None  # oneDNN's layout of a float weight, made by pack()
        self._onednn_version: int | None = None  # the weight's version counter when it was packed

    def pack(self) -> None:
        """Keep a copy of the weight in oneDNN's blocked layout. A plain [out, in] weight is
        reordered inside every oneDNN matmul call: prepacked, an 8-row decode step of havoc-tiny
        and havoc-small runs 1.3-1.7x faster, fp32 single rows ~10% faster (docs/LOG.md). CPU
        only, fp32 weights and bf16 ones on CPUs with native bf16; costs a second copy of the weight.
        The copy is dropped by ``.to()`` and copies of the module, and made again if the weight
        is edited in place."""
        w = self.weight
        if self._onednn is not None or self.scale is not None or self.int4 is not None or w.device.type != "cpu":
            return
        if not (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_has_native_bf16())):
            return
        try:
            self._onednn = torch.ops.mkldnn._reorder_linear_weight(w, 32)  # layout tuned for batches of ~32 rows
            self._onednn_version = _version(w)
        except (AttributeError, RuntimeError):  # a build without oneDNN
            self._onednn = None

    def _use_packed(self, x: Tensor) -> bool:
        if self._onednn is None or x.requires_grad or torch.compiler.is_compiling() or x.device.type != "cpu":
            return False  # (no autograd for the packed product; Inductor cannot lower it)
        if self._onednn_version is not None and _version(self.weight) != self._onednn_version:
            self._onednn = None  # edited in place since it was packed
            self.pack()
        # one half-precision row: ATen's kernel where the engine turned oneDNN off for it
        # (``engine.single_row_kernels``), else the packed one, as for several rows: the plain oneDNN
        # call rounds some rows differently (havoc-tiny's o_proj: 8 in 6,000), and a seeded request
        # must get the same tokens alone or batched
        return self._onednn is not None and (x.dtype == torch.float32 or x.numel() > x.shape[-1]
                                             or torch.backends.mkldnn.enabled)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .cuda(), ...: the layouts are of the old tensors
        self._onednn, self._fbgemm = None, None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the opaque layouts out
        return {**super().__getstate__(), "_onednn": None, "_fbgemm": None}

    def forward(self, x: Tensor) -> Tensor:
        if self.int4 is not None:
            return self._int4(x)
        if self.scale is not None:
            return self._int8(x)
        if self.weight.dtype != x.dtype:  # e.g. an fp32 prefill of bf16 weights
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self._use_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self._onednn, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _int8(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.numel() <= self.DECODE_ROWS * x.shape[-1] and self._fbgemm_ready():
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), self._fbgemm, True)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _int4(self, x: Tensor) -> Tensor:
        """ATen's int4 kernel on bf16 activations (on fp32 ones it measured several times slower)."""
        packed, scales_zeros = self.int4  # type: ignore[misc]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.INT4_GROUP, scales_zeros)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _fbgemm_ready(self) -> bool:
        """Pack the int8 weight for the CPU kernel once; False where no quantized engine exists."""
        if self._fbgemm is None:
            try:
                zeros = torch.zeros(self.weight.shape[0], dtype=torch.long)
                with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels not (yet)
                    warnings.simplefilter("ignore", UserWarning)
                    q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zeros, 0)
                bias = None if self.bias is None else self.bias.float()
                self._fbgemm = torch.ops.quantized.linear_prepack(q, bias)
            except (RuntimeError, NotImplementedError):
                self._fbgemm = False
        return self._fbgemm is not False


class CastRMSNorm(nn.RMSNorm):
    """RMSNorm that follows the activations' dtype (bf16 weights inside an fp32 prefill)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            weight = None if self.weight is None else self.weight.float()
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)
        h = x.float()  # half precision: normalise in fp32, scale in x's dtype (as HF Llama)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h if self.weight is None else h * self.weight.to(x.dtype)


def _int4_pack(weight: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """``weight`` [out, in] as asymmetric 4-bit codes per group of ``group`` inputs, in the layout of
    ATen's CPU int4 kernel: codes q in 0..15 stand for (q - 8) x scale + zero, scale and zero in
    bf16 ([in / group, out, 2]; the kernel reads them in the activations' dtype). Each group's
    range is its min..max shrunk by the factor (of ``INT4_SHRINK``) with the least squared error,
    and the codes are rounded against the bf16 scale and zero actually used."""
    w = weight.float().view(weight.shape[0], -1, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    best: tuple[Tensor, Tensor, Tensor] | None = None
    for shrink in INT4_SHRINK:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * shrink
        scale = (2 * half / 15).clamp(min=1e-8).bfloat16().float()
        zero = (mid - half + 8 * scale).bfloat16().float()
        codes = ((w - zero) / scale + 8).round().clamp(0, 15)
        error = ((codes - 8) * scale + zero - w).pow(2).sum(-1, keepdim=True)
        if best is None:
            best = (error, codes, torch.cat([scale, zero], -1))
        else:
            better = error < best[0]
            best = (torch.where(better, error, best[0]), torch.where(better, codes, best[1]),
                    torch.where(better, torch.cat([scale, zero], -1), best[2]))
    _, codes, scales_zeros = best  # type: ignore[misc]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).view(weight.shape), 1)
    return packed, scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


def _version(t: Tensor) -> int | None:
    """A tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def prepare_model(model: HavocModel, dtype: torch.dtype | None = None, quantize: Quantize | None = None, *,
                  pack: bool = False) -> HavocModel:
    """Convert ``model`` in place for inference: weights stored in ``dtype`` (e.g. bf16), the block
    and output matrices optionally int8, q/k/v and gate/up fused, and with ``pack`` a oneDNN copy
    of the float matrices (``InferenceLinear.pack``). Its activations may then run in any dtype."""
    dtype = dtype or model.embed.weight.dtype
    if quantize not in (None, *QUANTIZE):
        raise HavocError(f"quantize: expected {' or '.join(QUANTIZE)} or nothing, found {quantize!r}")
    model.eval().requires_grad_(False).to(dtype)
    # the output head stays int8 under int4 (as llama.cpp keeps it at 6-8 bits in its 4-bit files): on
    # the demo model an int4 head alone moved perplexity by ~2% (docs/LOG.md)
    head_quantize: Quantize | None = "int8" if quantize == "int4" else quantize
    for module in list(model.modules()):
        if isinstance(module, (Attention, GatedMLP)):
            module.fuse_projections()  # fewer ops per decode step: +8% tokens/s on havoc-tiny bf16
        if isinstance(module, nn.RMSNorm):
            module.__class__ = CastRMSNorm
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) or (isinstance(child, InferenceLinear) and child.scale is None
                                                and child.int4 is None):
                head = module is model and name == "lm_head"
                setattr(module, name, InferenceLinear(child.weight, child.bias, head_quantize if head else quantize,
                                                      dtype))
    if model.lm_head is None:  # tied: shares the embedding's storage, or a quantized copy
        model.lm_head = InferenceLinear(model.embed.weight, None, head_quantize, dtype)
    if pack:
        for module in model.modules():
            if isinstance(module, InferenceLinear):
                module.pack()
    return model


def is_packed(model: HavocModel) -> bool:
    """Whether any matrix has a oneDNN-packed copy (it doubles their memory)."""
    return any(isinstance(m, InferenceLinear) and m._onednn is not None for m in model.modules())


def load_for_inference(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                       quantize: Quantize | None = None, pack: bool = False) -> tuple[HavocModel, HavocTokenizer]:
    """Model and tokenizer of a checkpoint (or of a run's newest checkpoint), checked against each
    other, the model prepared for inference (``prepare_model``)."""
    ckpt = find_checkpoint(path)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise HavocError(f"{ckpt}: no {TOKENIZER_FILE} in this checkpoint (chat needs one; store it with "
                         f"`havoc init --tokenizer` or train with `havoc pretrain` / `havoc sft`)")
    # checksums.json is verified in a thread while the model is built and prepared (xxhash releases
    # the GIL): on havoc-2b the hash pass was 7% of the load in sequence. Nothing is returned before
    # its verdict; a named error of the structure checks comes first (as when they ran before the
    # hashes), while any other failure gives way to a refusal of the bytes that caused it
    with ThreadPoolExecutor(1) as pool:
        verdict = pool.submit(integrity.verify, ckpt, skip=(OPTIMIZER_FILE,))
        try:
            tokenizer = HavocTokenizer.load(ckpt)
            model = load_model(ckpt, device=device, check_hashes=False)
            tokenizer.check_compatible(model.config)
            prepare_model(model, dtype, quantize, pack=pack)
        except HavocError:
            raise
        except BaseException:
            verdict.result()
            raise
        verdict.result()
    return model, tokenizer


@dataclass
class Loaded:
    model: HavocModel
    tokenizer: HavocTokenizer
    path: Path
    n_params: int
    plan: InferencePlan
    seconds: float


def load(checkpoint: str | Path | None, *, device: str = "auto", dtype: str = "auto", quantize: Quantize | None = None,
         batching: bool = False, pack: bool | None = None) -> Loaded:
    """What every command that runs a model does first: resolve the checkpoint (default: the newest
    chat checkpoint), plan its dtypes and kernels for this machine, load and prepare it."""
    t0 = time.perf_counter()
    path = resolve_checkpoint(checkpoint)
    n_params = load_config(path).num_parameters()
    plan = plan_inference(n_params, device=device, dtype=dtype, quantize=quantize, batching=batching, pack=pack)
    model, tok = load_for_inference(path, device=plan.device, dtype=plan.weights, quantize=plan.quantize,
                                    pack=plan.pack)
    plan = dataclasses.replace(plan, pack=is_packed(model))  # as carried out: int8, or no oneDNN, packs nothing
    return Loaded(model, tok, path, n_params, plan, time.perf_counter() - t0)
