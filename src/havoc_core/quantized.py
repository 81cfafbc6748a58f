"""The int4 and int8 forms of a matrix, the same on every machine and torch build, and the
quantization.json that marks a checkpoint stored in them (``inference.quantize_checkpoint`` writes
one, ``inference.load_for_inference`` reads it). Kernel layouts are made from these at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from havoc_core.checkpoint import QUANTIZATION_FILE
from havoc_core.errors import CheckpointError
from havoc_core.precision import QUANTIZE, Quantize

INT4_GROUP = 32  # inputs sharing one int4 scale and zero (as llama.cpp's Q4_0 blocks)
INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)  # int4 ranges tried per group (clipping outliers can pay)


def quantize_matrix(weight: Tensor, quantize: Quantize) -> dict[str, Tensor]:
    """The stored form of a matrix [out, in], the same on every machine and torch build (what
    ``havoc quantize`` writes):
    - int8: ``weight`` int8 [out, in] and ``scale`` fp32 [out], one symmetric scale per row;
    - int4: ``qweight`` uint8 [out, in / 2], codes 0..15 (input 2j in the low nibble, 2j + 1 in
      the high one), and ``qscale`` bf16 [in / 32, out, 2], a (scale, zero) per group of 32 inputs:
      code q stands for (q - 8) x scale + zero. A matrix whose inputs are no whole number of
      groups is stored int8 instead.
    Each int4 group's range is its min..max shrunk by the factor (of ``INT4_SHRINK``) with the least
    squared error, and the codes are rounded against the bf16 scale and zero actually used."""
    group = INT4_GROUP
    if quantize == "int8" or weight.shape[1] % group:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        return {"weight": (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": scale}
    w = weight.detach().float().view(weight.shape[0], -1, group)
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
    q = codes.to(torch.uint8).view(weight.shape[0], -1, 2)
    return {"qweight": q[..., 0] | (q[..., 1] << 4), "qscale": scales_zeros.transpose(0, 1).contiguous().bfloat16()}


def int4pack_layout(qweight: Tensor) -> Tensor:
    """ATen's packed layout of int4 codes: it depends on the CPU kind (AVX2 and AVX-512 builds
    interleave differently), so it is made at load time and never stored."""
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(qweight.shape[0], -1).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def head_quantize(quantize: Quantize | None) -> Quantize | None:
    """The output head stays int8 under int4 (as llama.cpp keeps it at 6-8 bits in its 4-bit files):
    on the demo model an int4 head alone moved perplexity by ~2% (docs/LOG.md)."""
    return "int8" if quantize == "int4" else quantize


def stored_quantization(ckpt: Path) -> Quantize | None:
    """The method of a quantized checkpoint (its quantization.json), None for a float one."""
    path = ckpt / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    method = info.get("method") if isinstance(info, dict) else None
    if method not in QUANTIZE:
        raise CheckpointError(f"{path}: method: expected {' or '.join(QUANTIZE)}, found {method!r}")
    if info.get("group_size") != INT4_GROUP:
        raise CheckpointError(f"{path}: group_size: expected {INT4_GROUP}, "
                              f"found {info.get('group_size')!r}")
    return method


def take(state: dict[str, Tensor], path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype | None,
          what: str) -> Tensor:
    """``state[key]``, removed from ``state``, or a refusal that names it, unless it has ``shape``
    and ``dtype`` (None: any float dtype)."""
    t = state.pop(key, None)
    if t is None or tuple(t.shape) != tuple(shape) or (t.dtype != dtype if dtype else not t.is_floating_point()):
        found = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        want = str(dtype).removeprefix("torch.") if dtype else "float"
        raise CheckpointError(f"{path}: {key}: expected {want} {list(shape)} ({what}), found {found}")
    return t
