"""Training-step throughput: HAVOC vs Hugging Face ``LlamaForCausalLM`` of the same shape and weights.

One step = forward + backward + AdamW on a [batch, seq] window of random tokens, in the trainer's
dtype (``--dtype auto``: bf16 autocast on CUDA and on CPUs with native bf16, else fp32).
Both models run in the same process, interleaved, so the ratio is fair
even on a noisy machine. Also prints the fraction of this machine's measured matmul FLOP/s.

    python bench/train_throughput.py [--presets havoc-tiny havoc-small] [--steps 5] [--compile]
                                     [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch

from havoc_core import HavocModel, get_preset
from havoc_core.hf import to_llama
from havoc_core.metrics import peak_flops
from havoc_core.precision import training_dtype

SHAPES = {"havoc-tiny": (16, 256), "havoc-small": (4, 256), "havoc-2b": (8, 1024)}


def step_time(model: torch.nn.Module, x: torch.Tensor, hf: bool, steps: int, amp) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
    times = []
    for i in range(steps + 2):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = model(input_ids=x, labels=x).loss if hf else model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["havoc-tiny", "havoc-small"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(HAVOC)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = training_dtype(args.dtype, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    peak = peak_flops(device, dtype)
    print(f"device {device}, {torch.get_num_threads()} threads, {str(dtype)[6:]}, peak {peak / 1e9:.0f} GFLOP/s "
          f"({'bf16 table' if device.type == 'cuda' else 'measured matmul'})")
    results = []
    for name in args.presets:
        cfg = get_preset(name)
        batch, seq = SHAPES.get(name, (8, 256))
        torch.manual_seed(0)
        havoc = HavocModel(cfg).to(device)
        llama = copy.deepcopy(to_llama(havoc)).to(device).train()
        havoc.train()
        # HF shifts labels inside the model: give it seq+1 tokens as HAVOC gets seq inputs + seq targets.
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
        variants = {"havoc": (havoc, False), "hf": (llama, True)}
        if args.compile:
            variants["havoc+compile"] = (torch.compile(copy.deepcopy(havoc)), False)
        timings: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(2):  # interleave to share machine noise
            for k, (m, hf) in variants.items():
                timings[k] += step_time(m, x, hf, args.steps, amp)
        flops = cfg.flops_per_token(seq) * batch * seq
        row = {"preset": name, "batch": batch, "seq": seq, "device": str(device), "dtype": str(dtype)}
        for k, ts in timings.items():
            t = statistics.median(ts)
            row[k] = {"tokens_per_s": batch * seq / t, "fraction_of_peak": flops / t / peak}
        for k in timings:
            row[k]["vs_hf"] = row[k]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        results.append(row)
        for k in timings:
            r = row[k]
            print(f"{name:12s} {k:14s} B={batch} T={seq}: {r['tokens_per_s']:9.0f} tok/s  "
                  f"{r['fraction_of_peak']:6.1%} of peak  {r['vs_hf']:.2f}x HF")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
