"""CPU inference: llama.cpp (llama-cpp-python, compiled from its sdist) on `havoc export --format gguf`
files vs HAVOC's engine on the same checkpoint, same threads, in one process, interleaved.

For each preset (random weights, seeded): decode tokens/s at batch 1 after a 32-token prompt (the
rate of N tokens minus that of 1, so prefill cancels out; best of ``--repeat``) and the time of a
512-token prefill. llama.cpp runs BF16, Q8_0, Q4_0 and Q4_K_M files (F16 too with ``--f16``); HAVOC
runs bf16, int8 and int4 weights as `havoc chat` does (HAVOC's own kernels; ``HAVOC_OWN_KERNELS=0``
forces fbgemm's int8 and ATen's int4pack). Ratios are HAVOC / llama.cpp. llama.cpp repacks
quantized weights for the CPU at hand (AVX2/AVX-512 interleaving, AMX); where that crashes (its
AMX path did on an AMX Xeon: a probe in a child process finds out), every llama.cpp run is made
without it and the results say so.

The AVX2 kind on an AVX-512 machine: HAVOC under ``precision.AVX2_EMULATION`` and llama.cpp built for
AVX2 only (it picks its kernels when compiled, not from the environment; docs/GGUF.md has the
``CMAKE_ARGS``). ``llama_cpp_system_info`` in the results says which build ran.

    python bench/llamacpp.py [--presets havoc-small havoc-2b] [--tokens 32] [--repeat 2] [--threads 2] [--compile]
Results also go to bench/results/llamacpp.json. (Not named gguf.py: a script there would shadow the
gguf package for everything the benchmark imports.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import torch
from decode import PREFILL_LEN, PROMPT_LEN, build, havoc_prefill, havoc_run, prompts

from havoc_core.builtin_corpus import builtin_documents
from havoc_core.checkpoint import save_model
from havoc_core.gguf_export import export_gguf
from havoc_core.inference import prepare_model
from havoc_core.precision import AVX2_EMULATION, cpu_has_native_bf16, weights_dtype
from havoc_core.tokenizer import HavocTokenizer


def llama_decode(llm: llama_cpp.Llama, ids: list[int], new_tokens: int) -> float:
    """Seconds for the prompt plus ``new_tokens`` single-token steps in llama.cpp's own KV cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    for i in range(new_tokens - 1):
        llm.eval([ids[i % len(ids)]])
    return time.perf_counter() - t0


def llama_prefill(llm: llama_cpp.Llama, ids: list[int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t0)
    return best


def rates(runs: dict, tokens: int, repeat: int) -> dict[str, float]:
    """Decode tokens/s per runner: (N - 1) tokens over time(N) - time(1); runners alternate."""
    short = {name: float("inf") for name in runs}
    long = dict(short)
    for _ in range(repeat):
        for name, run in runs.items():
            short[name] = min(short[name], run(1))
            long[name] = min(long[name], run(tokens))
    return {name: (tokens - 1) / max(long[name] - short[name], 1e-9) for name in runs}


PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
llm.eval(list(range(1, 17)))
"""


def repack_works(gguf: Path) -> bool:
    """Whether llama.cpp survives a prefill of a quantized file with its repacked weights (a child
    process: a crash there is an answer, not the end of the benchmark)."""
    return subprocess.run([sys.executable, "-c", PROBE, str(gguf)], capture_output=True, timeout=300).returncode == 0


def no_repack() -> None:
    """Every llama.cpp model from here on uses the weights as written (``llama-cli --no-repack``)."""
    from llama_cpp import llama_cpp as c_api

    default = c_api.llama_model_default_params

    def params() -> c_api.llama_model_params:
        p = default()
        p.use_extra_bufts = False
        return p

    c_api.llama_model_default_params = params


def bench_preset(preset: str, args: argparse.Namespace, tmp: Path) -> dict:
    model = build(preset, torch.bfloat16)
    cfg = model.config
    tok = HavocTokenizer.train(builtin_documents(), vocab_size=cfg.vocab_size, show_progress=False)
    ckpt = save_model(tmp / preset, model, tokenizer=tok)
    kinds = ["bf16", "q8_0", "q4_0", "q4_k_m", *(["f16"] if args.f16 else [])]
    files = {k: export_gguf(ckpt, tmp / f"{preset}-{k}.gguf", k) for k in kinds}
    repack = all(repack_works(files[k]) for k in ("q8_0", "q4_0", "q4_k_m"))
    if not repack:
        no_repack()
    llms = {k: llama_cpp.Llama(model_path=str(f), n_ctx=PREFILL_LEN + 64, n_batch=PREFILL_LEN,
                               n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            for k, f in files.items()}
    int8 = prepare_model(copy.deepcopy(model).float(), torch.float32, "int8")  # before `model` is prepared in place
    int4 = prepare_model(copy.deepcopy(model), weights_dtype("auto", 0, "cpu", "int4"), "int4")
    havoc = {"bf16": prepare_model(model, torch.bfloat16), "int8": int8, "int4": int4}
    prompt = prompts(1, PROMPT_LEN, cfg.vocab_size)
    runs = {f"llama.cpp {k.upper()}": (lambda n, llm=llm: llama_decode(llm, prompt[0].tolist(), n))
            for k, llm in llms.items()}
    runs |= {f"HAVOC {k}": (lambda n, m=m: havoc_run(m, prompt, n)) for k, m in havoc.items()}
    if args.compile:  # `havoc chat --compile`: every decode step compiles whole (HAVOC's kernels are operators)
        for k in ("bf16", "int8", "int4"):
            havoc_run(havoc[k], prompt, 2, compile=True)  # the first compile (tens of seconds) is not timed
            runs[f"HAVOC {k} compiled"] = lambda n, m=havoc[k]: havoc_run(m, prompt, n, compile=True)
    decode = rates(runs, args.tokens, args.repeat)
    long_prompt = prompts(1, PREFILL_LEN, cfg.vocab_size, seed=1)
    prefill = {f"llama.cpp {k.upper()}": llama_prefill(llm, long_prompt[0].tolist(), args.prefill_repeat)
               for k, llm in llms.items()}
    prefill |= {f"HAVOC {k}": havoc_prefill(m, long_prompt, args.prefill_repeat) for k, m in havoc.items()}
    for llm in llms.values():
        llm.close()
    pairs = [("HAVOC bf16", "llama.cpp BF16"), ("HAVOC int8", "llama.cpp Q8_0"), ("HAVOC int4", "llama.cpp Q4_0"),
             ("HAVOC int4", "llama.cpp Q4_K_M")]
    if args.compile:
        pairs += [("HAVOC bf16 compiled", "llama.cpp BF16"), ("HAVOC int8 compiled", "llama.cpp Q8_0"),
                  ("HAVOC int4 compiled", "llama.cpp Q4_0"),
                  ("HAVOC int4 compiled", "llama.cpp Q4_K_M")]
        compiled = ("HAVOC bf16", "HAVOC int8", "HAVOC int4")
        prefill |= {f"{name} compiled": prefill[name] for name in compiled}  # (eager prefill)
    return {"params": cfg.num_parameters(), "llama_cpp_repack": repack,
            "decode_tokens_per_s": decode, "prefill_512_s": prefill,
            "decode_ratio": {f"{a} / {b}": decode[a] / decode[b] for a, b in pairs},
            "prefill_speed_ratio": {f"{a} / {b}": prefill[b] / prefill[a] for a, b in pairs},
            "gguf_mib": {k: f.stat().st_size / 2**20 for k, f in files.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=["havoc-small"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefill-repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--f16", action="store_true", help="also a llama.cpp F16 file")
    ap.add_argument("--compile", action="store_true", help="also HAVOC bf16, int8 and int4 with a torch.compile'd step")
    ap.add_argument("--tmp", help="where the checkpoints and .gguf files go (default: a temporary dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "native_bf16": cpu_has_native_bf16(), "llama_cpp_python": llama_cpp.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "isa_env": {k: os.environ.get(k) for k in AVX2_EMULATION},
               "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode()}  # which ISA it was built for
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for preset in args.presets:
            results[preset] = bench_preset(preset, args, Path(tmp))
            r = results[preset]
            print(f"\n{preset} ({r['params'] / 1e6:,.0f}M), batch-1 decode tokens/s and 512-token prefill s:")
            for name, rate in r["decode_tokens_per_s"].items():
                print(f"  {name:<16} {rate:8.2f} tok/s   prefill {r['prefill_512_s'][name]:7.2f} s")
            for pair, ratio in r["decode_ratio"].items():
                print(f"  decode  {pair}: {ratio:.2f}x   prefill speed: {r['prefill_speed_ratio'][pair]:.2f}x")
    out = Path(__file__).parent / "results" / "llamacpp.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
