"""A candidate int4 kernel against ATen's: the open part of issue 18 (int4 decode behind llama.cpp).

ATen's ``_weight_int4pack_mm_for_cpu`` (what ``--quantize int4`` runs) reads ~9 GB/s of int4 codes
per core on havoc's shapes: it is compute-bound, and llama.cpp's repacked Q4_0 runs a whole
havoc-small step faster than ATen's int4 products alone. Nothing well-kept does better on x86 in
torch 2.13 (docs/LOG.md 2026-12-06), so this measures a kernel of our own before anyone wires it in:

- the activations are rounded to int8 with one scale per group of 32 inputs (as llama.cpp's Q8_0),
  so every group is an exact integer dot product of 4-bit codes and 8-bit values (AVX-512 VNNI
  ``vpdpbusd``, 64 products an instruction), scaled once per group in fp32;
- a stored int4 group (``quantized.quantize_matrix``: code q stands for (q - 8) x scale + zero) is
  repacked as Q4_0 does (byte j: input j | input j + 16), its zero folded into one fp32 term per
  group: value = scale x q + (zero - 8 x scale);
- one row of activations, rows split over torch's threads (``at::parallel_for``).

Printed per matrix shape (havoc-small's and havoc-2b's largest): microseconds per product, GB/s
of codes read, the relative error against the exact product of the dequantized weight (ATen's
kernel takes bf16 activations, so its error is the bf16 rounding) and the speed-up over ATen.
Needs an x86 CPU with AVX-512 VNNI, a C++ compiler and ninja; the first run compiles (~30 s).

    python bench/int4_kernel.py [--threads 2] [--repeat 5]
Results also go to bench/results/int4_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.cpp_extension import load_inline

from havoc_core.quantized import INT4_GROUP, int4_kernel_layout, quantize_matrix

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

// y[n] = sum_k value(n, k) x[k].  w: uint8 [N, K/2], 64 bytes per block of 4 groups of 32 inputs
// (byte 16 i + j of a block: code of input j of its group i, low nibble, and of input j + 16, high);
// s, m: fp32 [N, K/32], value = s q + m.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor m) {
  const int64_t K = x.size(0), N = w.size(0), G = K / 32, B = K / 128;
  auto xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  std::vector<int8_t> xq(128 * B);  // per block: the 4 groups' inputs 0..15, then their 16..31
  std::vector<float> sx(G), c(G);    // per group: the activations' scale, and scale x sum of codes
  for (int64_t g = 0; g < G; ++g) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xp[g * 32 + j]));
    const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / scale;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int q = (int)std::nearbyint(xp[g * 32 + j] * inv);
      sum += q;
      xq[(g / 4) * 128 + (j < 16 ? 0 : 64) + (g % 4) * 16 + j % 16] = (int8_t)q;
    }
    sx[g] = scale;
    c[g] = scale * (float)sum;
  }
  auto y = torch::empty({N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = wp + n * (K / 2);
      const float* sr = sp + n * G;
      const float* mr = mp + n * G;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t b = 0; b < B; ++b) {
        const __m512i codes = _mm512_loadu_si512(wr + 64 * b);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(codes, low),
                                          _mm512_loadu_si512(xq.data() + 128 * b));
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(codes, 4), low),
                                  _mm512_loadu_si512(xq.data() + 128 * b + 64));
        const __m128 scales = _mm_mul_ps(_mm_loadu_ps(sr + 4 * b), _mm_loadu_ps(sx.data() + 4 * b));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(scales)),
                              acc);
      }
      __m512 zeros = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 16 <= G; g += 16)
        zeros = _mm512_fmadd_ps(_mm512_loadu_ps(c.data() + g), _mm512_loadu_ps(mr + g), zeros);
      float tail = 0.f;
      for (; g < G; ++g) tail += c[g] * mr[g];
      yp[n] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(zeros) + tail;
    }
  });
  return y;
}
"""

SHAPES = {  # name: (out, in)
    "havoc-small qkv": (1280, 768), "havoc-small o": (768, 768), "havoc-small w13": (4096, 768),
    "havoc-small w2": (768, 2048), "havoc-2b w13": (13824, 2560), "havoc-2b w2": (2560, 6912),
}


def repack(qweight: Tensor, qscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's layout of a stored int4 matrix: codes in Q4_0's order, fp32 scales and offsets."""
    out = qweight.shape[0]
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(out, -1, INT4_GROUP)
    packed = (codes[:, :, :16] | (codes[:, :, 16:] << 4)).reshape(out, -1).contiguous()
    scale, zero = (qscale.float()[..., i].t().contiguous() for i in (0, 1))
    return packed, scale, (zero - 8 * scale).contiguous()


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


def measure(kernel: Any, out: int, inp: int, repeat: int) -> dict[str, float]:
    """Both kernels on one random int4 matrix [out, inp] and one row of activations."""
    parts = quantize_matrix(torch.randn(out, inp) * 0.02, "int4")
    x = torch.randn(inp)
    exact = dequantized(parts["qweight"], parts["qscale"]) @ x
    packed, scale, offset = repack(parts["qweight"], parts["qscale"])
    aten_weight, xb = int4_kernel_layout(parts["qweight"]), x[None].bfloat16()

    def ours() -> Tensor:
        return kernel.int4_gemv(x, packed, scale, offset)

    def aten() -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, aten_weight, INT4_GROUP, parts["qscale"])

    row = {"ours_us": best_us(ours, repeat), "aten_us": best_us(aten, repeat),
           "ours_rel_err": float((ours() - exact).norm() / exact.norm()),
           "aten_rel_err": float((aten()[0].float() - exact).norm() / exact.norm())}
    gigabytes = out * inp / 2 / 1e9
    return row | {"ours_gb_s": gigabytes / row["ours_us"] * 1e6, "aten_gb_s": gigabytes / row["aten_us"] * 1e6,
                  "speedup": row["aten_us"] / row["ours_us"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # -fopenmp: ATen's parallel_for runs on torch's OpenMP pool only when the extension is built with it
    kernel = load_inline("havoc_int4_gemv_bench", cpp_sources=SOURCE, functions=["int4_gemv"],
                         extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                         extra_ldflags=["-fopenmp"])
    results: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        results[name] = row = measure(kernel, out, inp, args.repeat)
        print(f"{name:16s} {out}x{inp}: ours {row['ours_us']:7.1f} us ({row['ours_gb_s']:4.1f} GB/s, error "
              f"{row['ours_rel_err']:.4f}) | ATen int4 {row['aten_us']:7.1f} us ({row['aten_gb_s']:4.1f} GB/s, "
              f"error {row['aten_rel_err']:.4f}) | {row['speedup']:.2f}x", flush=True)
    path = Path(__file__).parent / "results" / "int4_kernel.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "shapes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
