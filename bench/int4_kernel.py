"""HAVOC's int4 kernel (``havoc_core.int4_kernel``, what ``--quantize int4`` runs) against ATen's
``_weight_int4pack_mm_for_cpu`` (what it ran before, and still runs where ours cannot be built),
per matrix product on havoc-small's and havoc-2b's matrix shapes.

Printed per shape and row count (1: a chat's decode step, 8: a server's batch, 64: the largest
call the kernel takes before a prefill switches to a dequantized float matmul): microseconds per
product, GB/s of int4 codes read, the relative error against the exact product of the
dequantized weight (ours rounds activations to int8 per group of 32, ATen's takes bf16
activations), and the speed-up over ATen. Run it under ``precision.AVX2_EMULATION`` for the AVX2
build (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2``).

    python bench/int4_kernel.py [--threads 2] [--repeat 5]
Results also go to bench/results/int4_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from havoc_core import int4_kernel
from havoc_core.quantized import INT4_GROUP, int4_kernel_layout, quantize_matrix

SHAPES = {  # name: (out, in)
    "havoc-small qkv": (1280, 768), "havoc-small o": (768, 768), "havoc-small w13": (4096, 768),
    "havoc-small w2": (768, 2048), "havoc-2b w13": (13824, 2560), "havoc-2b w2": (2560, 6912),
}


def dequantized(qweight: Tensor, qscale: Tensor) -> Tensor:
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(qweight.shape[0], -1).float()
    scale, zero = (qscale.float()[..., i].t().repeat_interleave(INT4_GROUP, 1) for i in (0, 1))
    return (codes - 8) * scale + zero


def best_us(fn: Callable[[], object], repeat: int, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def measure(kernel: int4_kernel.Kernel, out: int, inp: int, rows: int, repeat: int) -> dict[str, float]:
    """Both kernels on one random int4 matrix [out, inp] and ``rows`` rows of activations."""
    parts = quantize_matrix(torch.randn(out, inp) * 0.02, "int4")
    x = torch.randn(rows, inp)
    exact = x @ dequantized(parts["qweight"], parts["qscale"]).t()
    packed = int4_kernel.layout(parts["qweight"], parts["qscale"])
    aten_weight, xb = int4_kernel_layout(parts["qweight"]), x.bfloat16()

    def ours() -> Tensor:
        return kernel.linear(x, packed, out)

    def aten() -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, aten_weight, INT4_GROUP, parts["qscale"])

    calls = max(5, 20_000_000 // (out * inp * max(1, rows // 4)))
    row = {"ours_us": best_us(ours, repeat, calls), "aten_us": best_us(aten, repeat, calls),
           "ours_rel_err": float((ours() - exact).norm() / exact.norm()),
           "aten_rel_err": float((aten().float() - exact).norm() / exact.norm())}
    gigabytes = out * inp / 2 / 1e9
    return row | {"ours_gb_s": gigabytes / row["ours_us"] * 1e6, "aten_gb_s": gigabytes / row["aten_us"] * 1e6,
                  "speedup": row["aten_us"] / row["ours_us"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = int4_kernel.load()
    if not isinstance(kernel, int4_kernel.Kernel):
        raise SystemExit(f"error: HAVOC's int4 kernel is not available here: {kernel}")
    results: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        for rows in (1, 8, 64):
            results[f"{name} x{rows}"] = row = measure(kernel, out, inp, rows, args.repeat)
            print(f"{name:16s} {out}x{inp} x{rows:<2d}: ours {row['ours_us']:8.1f} us ({row['ours_gb_s']:4.1f} GB/s, "
                  f"error {row['ours_rel_err']:.4f}) | ATen {row['aten_us']:8.1f} us ({row['aten_gb_s']:4.1f} GB/s, "
                  f"error {row['aten_rel_err']:.4f}) | {row['speedup']:.2f}x", flush=True)
    path = Path(__file__).parent / "results" / "int4_kernel.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "isa": kernel.isa, "shapes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
