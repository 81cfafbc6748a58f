"""HAVOC's int4 and int8 kernels (``havoc_core.quant_kernel``, what ``--quantize int4`` and a chat's
``--quantize int8`` run) against what runs where ours cannot be built: ATen's
``_weight_int4pack_mm_for_cpu`` and fbgemm's int8 product (which batching engines keep), per
matrix product on havoc-small's and havoc-2b's matrix shapes.

Printed per kind, shape and row count (1: a chat's decode step, 8: a server's batch, 64: the
largest call the kernel takes before a prefill switches to a dequantized float matmul):
microseconds per product, GB/s of codes read, the relative error against the exact product of
the dequantized weight (ours rounds activations to int8 per group of 32, ATen's takes bf16
activations, fbgemm rounds each call's activations to 7 bits with one range), and the speed-up.
Run it under ``precision.AVX2_EMULATION`` for the AVX2 build (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2``).

    python bench/quant_kernel.py [--threads 2] [--repeat 5]
Results also go to bench/results/quant_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from havoc_core import quant_kernel
from havoc_core.quantized import INT4_GROUP, int4pack_layout, quantize_matrix

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


def fbgemm_product(weight: Tensor, scale: Tensor) -> Callable[[Tensor], Tensor]:
    """fbgemm's int8 product of a per-row-scaled int8 matrix (as ``InferenceLinear`` packs it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(len(scale), dtype=torch.long)
        q = torch._make_per_channel_quantized_tensor(weight, scale.double(), zeros, 0)
    packed = torch.ops.quantized.linear_prepack(q, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def measure(kernel: quant_kernel.Kernel, bits: str, out: int, inp: int, rows: int, repeat: int) -> dict[str, float]:
    """Ours and the library's kernel on one random matrix [out, inp] and ``rows`` rows of activations."""
    parts = quantize_matrix(torch.randn(out, inp) * 0.02, bits)  # type: ignore[arg-type]
    x = torch.randn(rows, inp)
    if bits == "int4":
        exact = x @ dequantized(parts["qweight"], parts["qscale"]).t()
        packed, scale = quant_kernel.int4_layout(parts["qweight"], parts["qscale"]), None
        aten_weight, xb = int4pack_layout(parts["qweight"]), x.bfloat16()

        def library() -> Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, aten_weight, INT4_GROUP, parts["qscale"])
    else:
        exact = x @ (parts["weight"].float() * parts["scale"][:, None]).t()
        packed, scale = quant_kernel.int8_layout(parts["weight"]), parts["scale"]
        fbgemm = fbgemm_product(parts["weight"], parts["scale"])

        def library() -> Tensor:
            return fbgemm(x)

    def ours() -> Tensor:
        return kernel.linear(x, packed, out, scale)

    calls = max(5, 20_000_000 // (out * inp * max(1, rows // 4)))
    row = {"ours_us": best_us(ours, repeat, calls), "library_us": best_us(library, repeat, calls),
           "ours_rel_err": float((ours() - exact).norm() / exact.norm()),
           "library_rel_err": float((library().float() - exact).norm() / exact.norm())}
    gigabytes = out * inp / (2 if bits == "int4" else 1) / 1e9
    return row | {"ours_gb_s": gigabytes / row["ours_us"] * 1e6, "library_gb_s": gigabytes / row["library_us"] * 1e6,
                  "speedup": row["library_us"] / row["ours_us"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = quant_kernel.load()
    if not isinstance(kernel, quant_kernel.Kernel):
        raise SystemExit(f"error: HAVOC's kernels are not available here: {kernel}")
    results: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    for bits, library in (("int4", "ATen"), ("int8", "fbgemm")):
        for name, (out, inp) in SHAPES.items():
            for rows in (1, 8, 64):
                results[f"{bits} {name} x{rows}"] = row = measure(kernel, bits, out, inp, rows, args.repeat)
                print(f"{bits} {name:16s} {out}x{inp} x{rows:<2d}: ours {row['ours_us']:8.1f} us "
                      f"({row['ours_gb_s']:4.1f} GB/s, error {row['ours_rel_err']:.4f}) | {library} "
                      f"{row['library_us']:8.1f} us ({row['library_gb_s']:4.1f} GB/s, error "
                      f"{row['library_rel_err']:.4f}) | {row['speedup']:.2f}x", flush=True)
    path = Path(__file__).parent / "results" / "quant_kernel.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "isa": kernel.isa, "shapes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
