"""Models prepared for inference: fused, frozen matrices in their storage dtype (bf16/fp16/fp32 or
int8), optionally prepacked for oneDNN on CPU, and loading a checkpoint that way.

Each phase computes in the dtype ``precision`` picks: a prefill may upcast (dequantise) matrices on
the fly, a decode step reads each stored weight once, in the stored dtype.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from havoc_core import integrity, quant_kernel
from havoc_core.attention import Attention
from havoc_core.checkpoint import (
    OPTIMIZER_FILE,
    QUANTIZATION_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    load_config,
    resolve_checkpoint,
    save_checkpoint,
)
from havoc_core.errors import CheckpointError, HavocError
from havoc_core.hugepages import HugePageBlock, aligned
from havoc_core.mlp import GatedMLP
from havoc_core.model import HavocModel, load_model
from havoc_core.precision import (
    QUANTIZE,
    CpuInfo,
    InferencePlan,
    Quantize,
    cpu_has_native_bf16,
    plan_inference,
)
from havoc_core.quantized import (
    INT4_GROUP,
    head_quantize,
    int4pack_layout,
    quantize_matrix,
    stored_quantization,
    take,
)
from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer

# fbgemm's int8 product as the C++ operator itself: the torch.ops wrapper scans every call's
# arguments for fake script objects (3 Python calls per product, ~2% of a havoc-small step)
_LINEAR_DYNAMIC = getattr(torch.ops.quantized.linear_dynamic, "_op", torch.ops.quantized.linear_dynamic)


class InferenceLinear(nn.Module):
    """A frozen linear layer stored for decoding: its weight in bf16/fp16/fp32, int8 with one
    scale per output row, or int4 in groups of ``quantized.INT4_GROUP`` inputs with a scale and a zero each.
    It computes in the activations' dtype: a float prefill may upcast the weight on the fly, a
    decode step reads the stored bytes once.

    Kernels on CPU, by what measured fastest here (docs/LOG.md):
    - one row of half-precision activations: ``F.linear``, which the engine runs on ATen's own
      kernel (``engine.slot_kernels``): up to 2.5x oneDNN's rate on small matrices;
    - int4 and int8: HAVOC's own kernels (``quant_kernel``) for up to ``quant_kernel.KERNEL_ROWS``
      rows, a float matmul on the dequantized matrix for more; in batching engines fbgemm's int8
      kernel (faster on several rows). Both round the activations to 8 bits on the fly: integer dot
      products make int8 faster than bf16 and fp32 on a CPU without native bf16. ATen's int4pack
      and fbgemm's int8 kernels where ours cannot be built;
    - several rows (and single fp32 rows), after ``pack()``: oneDNN on a copy of the weight in its
      blocked layout."""

    same_in_any_batch: ClassVar[bool] = False  # int8 rows rounded alike in any batch (set by a batching engine)

    def __init__(self, weight: Tensor | None, bias: Tensor | None, quantize: Quantize | None = None,
                 dtype: torch.dtype | None = None, *, parts: dict[str, Tensor] | None = None) -> None:
        """From a float ``weight`` (quantized here when ``quantize`` says so), or from the stored
        ``parts`` of an already quantized matrix (``quantize_matrix``; ``weight`` None)."""
        super().__init__()
        if weight is not None and quantize is not None:
            parts = quantize_matrix(weight, quantize)
        parts = parts or {}
        dtype = dtype or (weight.dtype if weight is not None else torch.bfloat16)
        # int4: the kernel's layout of the matrix, and its scales and zeros where it is ATen's
        self.int4: tuple[Tensor, Tensor | None] | None = None
        scale = parts.get("scale")
        if "qweight" in parts:  # the kernel's own layout is made here: ATen's differs between CPU kinds
            qweight, qscale = parts["qweight"], parts["qscale"]
            kernel = quant_kernel.load() if qweight.device.type == "cpu" else None
            if isinstance(kernel, quant_kernel.Kernel):
                self.int4 = (quant_kernel.int4_layout(qweight, qscale), None)
            else:
                self.int4 = (int4pack_layout(qweight), qscale.to(torch.bfloat16).contiguous())
            self.int4_shape = (qweight.shape[0], qweight.shape[1] * 2)
            weight = torch.empty(0, dtype=dtype, device=qweight.device)
        elif scale is not None:
            weight = parts["weight"]
        assert weight is not None, "a float weight or the parts of a quantized one"
        # buffers, so that model.to(device) moves them
        self.register_buffer("weight", weight.detach() if scale is not None else weight.detach().to(dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self._fbgemm: Any = None  # fbgemm's layout of an int8 weight, made on first CPU use
        self._own: Any = None  # HAVOC's kernel's layout of an int8 weight (``_own_ready``)
        self._anchor: Tensor | None = None  # the row that fixes the int8 kernel's range (see _int8)
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
        # (``engine.slot_kernels``), else the packed one, as for several rows: the plain oneDNN
        # call rounds some rows differently (havoc-tiny's o_proj: 8 in 6,000), and a seeded request
        # must get the same tokens alone or batched
        return self._onednn is not None and (x.dtype == torch.float32 or x.numel() > x.shape[-1]
                                             or torch.backends.mkldnn.enabled)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .cuda(), ...: the layouts are of the old tensors
        self._onednn, self._fbgemm, self._own = None, None, None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the opaque layouts out
        return {**super().__getstate__(), "_onednn": None, "_fbgemm": None, "_own": None}

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
        """HAVOC's kernel (``quant_kernel``; one custom operator under torch.compile) where it is
        built, except in batching engines: fbgemm's kernel is 1.2-3x faster on 8 rows. fbgemm rounds
        the activations to 8 bits with one range for the whole call: over several rows, a row's
        result would depend on the rows beside it (a seeded request got other tokens when batched)
        and one outlier token would coarsen a whole prompt. So each row is divided by its own
        largest magnitude and an anchor row [1, -1, 0, ...] is appended: the call's range is then
        always [-1, 1], each row is rounded as it would be alone, and the integer products are
        exact, so a row's result is the same in any batch. Batching engines set
        ``same_in_any_batch`` so that their single rows round as in a batch."""
        on_cpu = x.device.type == "cpu"
        if on_cpu and not InferenceLinear.same_in_any_batch and self._own_ready():
            # (fp32 scales: a .to(torch.bfloat16) casts them too)
            return self._own_product(x, self._own, self.weight.shape[0], self.scale.float())
        if not on_cpu or not self._fbgemm_ready():
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        x32 = x if x.dtype == torch.float32 else x.float()
        if x.numel() == x.shape[-1] and not InferenceLinear.same_in_any_batch:
            y = _LINEAR_DYNAMIC(x32, self._fbgemm, True)  # (any leading dims of size 1)
        else:
            rows = x32.reshape(-1, x.shape[-1])
            size = rows.abs().amax(-1, keepdim=True).clamp(min=1e-30)
            y = _LINEAR_DYNAMIC(torch.cat([rows / size, self._anchor]), self._fbgemm, True)
            y = (y[:-1] * size).view(*x.shape[:-1], -1)
        y = y if self.bias is None else y + self.bias.float()
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _int4(self, x: Tensor) -> Tensor:
        """Ours (``quant_kernel``), or ATen's int4 kernel on bf16 activations (on fp32 ones it
        measured several times slower)."""
        packed, scales_zeros = self.int4  # type: ignore[misc]
        if scales_zeros is None:
            return self._own_product(x, packed, self.int4_shape[0])
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, INT4_GROUP, scales_zeros).view(*x.shape[:-1], -1)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _own_product(self, x: Tensor, packed: Tensor, n: int, scale: Tensor | None = None) -> Tensor:
        """HAVOC's int4 (``scale`` None) or int8 product: the kernel for up to ``KERNEL_ROWS`` rows, a
        float matmul on the dequantized matrix for more (a prefill: compute-bound, so in the CPU's
        fastest dtype, bf16 where native)."""
        if torch.compiler.is_compiling():
            y = quant_kernel.compiled_linear(x, packed, scale, n)
        elif x.numel() <= quant_kernel.KERNEL_ROWS * x.shape[-1]:
            y = quant_kernel.load().linear(x, packed, n, scale)  # type: ignore[union-attr]
        else:
            dtype = torch.bfloat16 if CpuInfo.detect().native_bf16 else x.dtype
            y = quant_kernel.load().matmul(x, packed, n, dtype, scale)  # type: ignore[union-attr]
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _own_ready(self) -> bool:
        """Make HAVOC's kernel's layout of the int8 weight once (on first use: batching engines,
        which take fbgemm's, never make it); False where the kernel is not built."""
        if self._own is None:
            own = isinstance(quant_kernel.load(), quant_kernel.Kernel)
            self._own = quant_kernel.int8_layout(self.weight) if own else False
        return self._own is not False

    def _fbgemm_ready(self) -> bool:
        """Pack the int8 weight for the CPU kernel once; False where no quantized engine exists."""
        if self._fbgemm is None:
            try:
                zeros = torch.zeros(self.weight.shape[0], dtype=torch.long)
                with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels not (yet)
                    warnings.simplefilter("ignore", UserWarning)
                    q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zeros, 0)
                self._fbgemm = torch.ops.quantized.linear_prepack(q, None)  # the bias is added after scaling
                self._anchor = torch.zeros(1, self.weight.shape[1])
                self._anchor[0, :2] = torch.tensor([1.0, -1.0])[: self.weight.shape[1]]
            except (RuntimeError, NotImplementedError):
                self._fbgemm = False
        return self._fbgemm is not False


class CastRMSNorm(nn.RMSNorm):
    """RMSNorm that follows the activations' dtype (bf16 weights inside an fp32 prefill)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight is None or self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.normalized_shape, w, self.eps)
        # half precision: normalise in fp32, scale in x's dtype (as HF Llama)
        h = F.rms_norm(x.float(), self.normalized_shape, None, self.eps).to(x.dtype)
        return h if w is None else h * w


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
    if quantize == "int4":  # an int4 model's float parts are bf16 values, as its file keeps them
        model.to(torch.bfloat16)
    model.eval().requires_grad_(False).to(dtype)
    head_method = head_quantize(quantize)
    _inference_layout(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) or (isinstance(child, InferenceLinear) and child.scale is None
                                                and child.int4 is None):
                is_head = module is model and name == "lm_head"
                setattr(module, name, InferenceLinear(child.weight, child.bias, head_method if is_head else quantize,
                                                      dtype))
    if model.lm_head is None:  # tied: shares the embedding's storage, or a quantized copy
        model.lm_head = InferenceLinear(model.embed.weight, None, head_method, dtype)
    if pack:
        for module in model.modules():
            if isinstance(module, InferenceLinear):
                module.pack()
    return model


def layouts_in_huge_pages(model: HavocModel) -> None:
    """For a one-slot engine on CPU (a chat), once per model: HAVOC's kernel's layouts, int8 ones
    made now (its first step would), moved into huge pages (``hugepages``), one at a time (the peak
    is the block and one layout)."""
    if getattr(model, "_layouts_in_huge_pages", False):
        return
    built = isinstance(quant_kernel.load(), quant_kernel.Kernel)
    own = [m for m in model.modules() if isinstance(m, InferenceLinear)
           and ((m.int4 is not None and m.int4[1] is None) or (m.scale is not None and built))]
    block = HugePageBlock(sum(aligned(m.int4[0].nbytes if m.int4 is not None else
                                      quant_kernel.int8_layout_nbytes(*m.weight.shape)) for m in own))
    for m in own:
        if m.int4 is not None:
            m.int4 = (block.copy(m.int4[0]), None)
        else:
            m._own = block.copy(m._own if isinstance(m._own, Tensor) else quant_kernel.int8_layout(m.weight))
    model._layouts_in_huge_pages = True


def _inference_layout(model: HavocModel) -> None:
    """The module tree inference runs (and quantized checkpoints are stored in): q/k/v and gate/up
    fused (fewer ops per decode step: +8% tokens/s on havoc-tiny bf16), norms following the
    activations' dtype."""
    for module in list(model.modules()):
        if isinstance(module, (Attention, GatedMLP)):
            module.fuse_projections()
        if isinstance(module, nn.RMSNorm):
            module.__class__ = CastRMSNorm


def quantize_checkpoint(source: str | Path, out: str | Path, quantize: Quantize) -> Path:
    """Write ``source``'s model quantized (``quantize_matrix``'s portable parts of every matrix, q/k/v
    and gate/up fused) with its config and tokenizer to ``out``, with a
    quantization.json that marks it inference-only. Loading it (``load_for_inference``) does not
    quantize again: 4x fewer bytes to read than bf16 and no seconds of range search."""
    if quantize not in QUANTIZE:
        raise HavocError(f"quantize: expected {' or '.join(QUANTIZE)}, found {quantize!r}")
    ckpt = find_checkpoint(source)
    # quantized from the values quantizing at load time uses (``prepare_model``), so the file holds
    # exactly what that makes: embedding, norms and biases in fp32 beside int8, bf16 beside int4
    model = prepare_model(load_model(ckpt), torch.bfloat16 if quantize == "int4" else torch.float32)
    tokenizer = HavocTokenizer.load(ckpt) if (ckpt / TOKENIZER_FILE).is_file() else None
    state = {name: p for name, p in model.named_parameters()}  # embedding and norms
    for name, module in model.named_modules():
        if isinstance(module, InferenceLinear):
            parts = quantize_matrix(module.weight, head_quantize(quantize) if name == "lm_head" else quantize)
            state.update({f"{name}.{k}": v for k, v in parts.items()})
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
    info = {"method": quantize, "group_size": INT4_GROUP, "head": head_quantize(quantize),
            "source": str(ckpt)}
    return save_checkpoint(out, state, model.config, tokenizer=tokenizer,
                           extra_files={QUANTIZATION_FILE: json.dumps(info, indent=2) + "\n"})


def _load_quantized(ckpt: Path, device: str, dtype: torch.dtype) -> HavocModel:
    """The model of a ``quantize_checkpoint`` directory: every part's name, shape and dtype checked
    against what config.json builds (the error names the tensor), then used as stored."""
    cfg = load_config(ckpt)
    path = ckpt / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        model = HavocModel(cfg)
    _inference_layout(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if model.lm_head is None:
        linears.append(("lm_head", nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device="meta")))
    for name, linear in linears:
        out_f, in_f = linear.weight.shape
        int4 = f"{name}.qweight" in state
        if int4 and in_f % INT4_GROUP:
            raise CheckpointError(f"{path}: {name}.qweight: a {out_f}x{in_f} matrix has no whole groups of "
                                  f"{INT4_GROUP} inputs; expected its int8 form (weight, scale)")
        form = f"{'int4' if int4 else 'int8'} form of a {out_f}x{in_f} matrix"
        expected = ({"qweight": ((out_f, in_f // 2), torch.uint8),
                     "qscale": ((in_f // INT4_GROUP, out_f, 2), torch.bfloat16)} if int4 else
                    {"weight": ((out_f, in_f), torch.int8), "scale": ((out_f,), torch.float32)})
        parts = {part: take(state, path, f"{name}.{part}", shape, part_dtype, form)
                 for part, (shape, part_dtype) in expected.items()}
        bias = None if linear.bias is None else take(state, path, f"{name}.bias", (out_f,), None, form)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, InferenceLinear(None, bias, dtype=dtype,
                                                                                       parts=parts))
    floats = {name: take(state, path, name, p.shape, None, "embedding or norm").to(dtype)
              for name, p in model.named_parameters()}
    if state:
        raise CheckpointError(f"{path}: unexpected tensor {next(iter(state))} not built by config.json")
    model.load_state_dict(floats, strict=False, assign=True)
    return model.eval().requires_grad_(False)


def is_packed(model: HavocModel) -> bool:
    """Whether any matrix has a oneDNN-packed copy (it doubles their memory)."""
    return any(isinstance(m, InferenceLinear) and m._onednn is not None for m in model.modules())


def load_for_inference(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                       quantize: Quantize | None = None, pack: bool = False) -> tuple[HavocModel, HavocTokenizer]:
    """Model and tokenizer of a checkpoint (or of a run's newest checkpoint), checked against each
    other, the model prepared for inference (``prepare_model``). A quantized checkpoint
    (``quantize_checkpoint``) is used as stored: ``quantize`` must then be None or its method."""
    ckpt = find_checkpoint(path)
    stored = stored_quantization(ckpt)
    if stored is not None and quantize not in (None, stored):
        raise HavocError(f"{ckpt}: quantize: this checkpoint is stored {stored} ({QUANTIZATION_FILE}), found "
                         f"--quantize {quantize}; quantize the float checkpoint it was made from instead")
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
            if stored is not None:  # every matrix quantized already: nothing to convert or pack
                model = _load_quantized(ckpt, device, dtype or torch.bfloat16)
            else:
                model = prepare_model(load_model(ckpt, device=device, check_hashes=False), dtype, quantize, pack=pack)
            tokenizer.check_compatible(model.config)
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
    quantize = quantize or stored_quantization(find_checkpoint(path))
    plan = plan_inference(n_params, device=device, dtype=dtype, quantize=quantize, batching=batching, pack=pack)
    model, tok = load_for_inference(path, device=plan.device, dtype=plan.weights, quantize=plan.quantize,
                                    pack=plan.pack)
    plan = dataclasses.replace(plan, pack=is_packed(model))  # as carried out: int8, or no oneDNN, packs nothing
    return Loaded(model, tok, path, n_params, plan, time.perf_counter() - t0)
