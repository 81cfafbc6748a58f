"""Generation speed: HAVOC's engine vs Hugging Face transformers ``generate()`` on the same weights.

For each preset (random weights, seeded; transformers' ``LlamaForCausalLM`` comes from
``havoc_core.hf.to_llama`` and shares the very same tensors), in one process, interleaved:
- decode tokens/s at batch 1 and 8 (32-token prompts; greedy; eos ignored). Each side's decode rate
  is (tokens of an N-token run - tokens of a 1-token run) / (time difference), so the prefill and
  the first token cancel out; best of ``--repeat``;
- prefill time of a 512-token prompt (HAVOC computes it in bf16 where the CPU has native bf16,
  else in fp32 whatever the storage dtype);
- the memory-bandwidth bound: bytes of all weights but the input embedding, read once per token,
  over the bandwidth of a large fp32 ``F.linear`` matrix-vector product measured here and now;
- with ``--int8``: decode with int8 weights (HAVOC only; what `havoc serve` picks on CPUs without
  native bf16), timed in the same rounds;
- with ``--startup``: seconds from process start to the chat's ``You:`` prompt (a saved checkpoint),
  against a process that loads the exported HF model and tokenizer with ``from_pretrained``.

    python bench/decode.py [--presets havoc-tiny havoc-small havoc-2b] [--dtype bfloat16] [--int8]
                           [--startup] [--tokens 32] [--repeat 3] [--threads 2]
Results also go to bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from havoc_core import HavocModel, get_preset
from havoc_core.builtin_corpus import builtin_documents
from havoc_core.checkpoint import save_model
from havoc_core.data import open_split
from havoc_core.engine import Engine
from havoc_core.hf import export, to_llama
from havoc_core.inference import prepare_model
from havoc_core.model import load_model
from havoc_core.precision import cpu_has_native_bf16, prefill_dtype
from havoc_core.sampling import SamplingParams
from havoc_core.tokenizer import HavocTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_LEN, PREFILL_LEN = 32, 512


def gemv_bandwidth(repeat: int = 20) -> float:
    """GB/s of a 256 MB fp32 matrix-vector product (best of ``repeat``): the bound's denominator."""
    w, x = torch.randn(16384, 4096), torch.randn(1, 4096)
    best = min(timed(lambda: F.linear(x, w)) for _ in range(repeat))
    return w.numel() * 4 / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model: HavocModel) -> int:
    """Bytes a decode step reads: every parameter/buffer of the blocks, final norm and output
    matrix, not the input embedding (a lookup of one row) unless it doubles as the output matrix."""
    tied = model.lm_head is None
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "embed.weight" and not tied:
            continue
        total += t.numel() * t.element_size()
    return total


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, vocab, (batch, length), generator=g)


def havoc_run(model: HavocModel, ids: torch.Tensor, new_tokens: int, compile: bool = False) -> float:
    engine = Engine(model, max_batch=ids.shape[0], compile=compile)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for row in ids.tolist():
        engine.add(row, params)
    while engine.active():
        engine.step()
    return time.perf_counter() - t0


def hf_run(hf, ids: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0


def decode_rates(runs: dict, ids: torch.Tensor, tokens: int, repeat: int) -> dict[str, float]:
    """tokens/s of decoding alone for each runner: (N - 1) more tokens per row, prefill and first
    token cancelled; runners alternate, so a noisy neighbour hurts them alike; best of ``repeat``."""
    short = {name: float("inf") for name in runs}
    long = dict(short)
    for _ in range(repeat):
        for name, run in runs.items():
            short[name] = min(short[name], run(ids, 1))
            long[name] = min(long[name], run(ids, tokens))
    return {name: ids.shape[0] * (tokens - 1) / max(long[name] - short[name], 1e-9) for name in runs}


def havoc_prefill(model: HavocModel, ids: torch.Tensor, repeat: int) -> float:
    engine = Engine(model)
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    times = []
    for _ in range(repeat):
        engine.remove(0)
        times.append(timed(lambda: engine.add(ids[0].tolist(), params)))
    return min(times)


def startup_seconds(command: list[str], expect: str) -> float:
    import pexpect

    t0 = time.perf_counter()
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=600)
    child.expect(expect)
    elapsed = time.perf_counter() - t0
    child.terminate(force=True)
    return elapsed


def startup(model: HavocModel, preset: str, dtype: str) -> dict:
    """Process start -> `You:` for `havoc chat`, and -> loaded for transformers, same weights on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = HavocTokenizer.train(builtin_documents(), vocab_size=model.config.vocab_size, show_progress=False)
        ckpt = save_model(Path(tmp) / "ckpt", model, tokenizer=tok)
        export(ckpt, Path(tmp) / "hf")
        havoc = startup_seconds([sys.executable, "-m", "havoc_core.cli", "chat", str(ckpt), "--dtype", dtype],
                                "You: ")
        load_hf = (f"import torch, transformers as t; d={str(Path(tmp) / 'hf')!r}; "
                   f"t.AutoModelForCausalLM.from_pretrained(d, dtype=torch.{dtype}); "
                   "t.AutoTokenizer.from_pretrained(d); print('You: ', flush=True); input()")
        hf = startup_seconds([sys.executable, "-c", load_hf], "You: ")
    return {"havoc_s": havoc, "hf_s": hf, "ratio": hf / havoc}


def val_losses(checkpoint: str, data: str, windows: int = 8, seq_len: int = 256) -> dict[str, dict[str, float]]:
    """Validation loss of a trained checkpoint with fp32, bf16 and int8 weights on the same
    sequential windows of a prepared val split, two ways: one forward pass per window (the prefill
    path) and token by token through the KV cache (the decode path: bf16 activations for bf16,
    fbgemm's int8 kernel with 8-bit activations for int8)."""
    import numpy as np

    stream = np.concatenate([np.asarray(s) for s in open_split(data, "val")]).astype(np.int64)
    n = min(windows, (len(stream) - 1) // seq_len)
    tokens = torch.from_numpy(stream[: n * seq_len + 1])
    x, y = tokens[:-1].view(n, seq_len), tokens[1:].view(n, seq_len)
    reference = load_model(checkpoint)
    models = {"float32": reference, "bfloat16": prepare_model(copy.deepcopy(reference), torch.bfloat16),
              "int8": prepare_model(copy.deepcopy(reference), torch.float32, "int8")}
    out = {}
    with torch.inference_mode():
        for name, m in models.items():
            rows = list(range(n))
            whole = m(x, cache=m.make_cache(n, seq_len).view(rows, [0] * n, dtype=torch.float32))
            prefill = float(F.cross_entropy(whole.float().flatten(0, 1), y.flatten()))
            cache = m.make_cache(n, seq_len)
            logits = torch.cat([m(x[:, t : t + 1], cache=cache.view(rows, [t] * n)) for t in range(seq_len)], dim=1)
            decode = float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
            out[name] = {"prefill_path": prefill, "decode_path": decode}
    return out


def build(preset: str, dtype: torch.dtype) -> HavocModel:
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # havoc-2b is built directly in bf16 (4 GB, not 8 GB of fp32)
    try:
        return HavocModel(get_preset(preset)).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=["havoc-tiny", "havoc-small"])
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per row per timed run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="also HAVOC with int8 weights")
    ap.add_argument("--startup", action="store_true", help="also time process start -> You: prompt")
    ap.add_argument("--compile", action="store_true", help="also HAVOC with a torch.compile'd decode step")
    ap.add_argument("--val", nargs=2, metavar=("CHECKPOINT", "DATA_DIR"),
                    help="also report the validation-loss change of bf16 and int8 weights on a trained checkpoint")
    ap.add_argument("--hf-prefill-repeat", type=int, default=1, help="HF bf16 prefill of 2B takes ~90 s")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    bandwidth = gemv_bandwidth()
    print(f"fp32 F.linear matrix-vector bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads); "
          f"native bf16: {cpu_has_native_bf16()}", flush=True)
    results = {"bandwidth_gb_s": bandwidth, "threads": args.threads, "dtype": args.dtype, "presets": {}}
    if args.val:
        results["val_loss"] = losses = val_losses(*args.val)
        for path in ("prefill_path", "decode_path"):
            ref = losses["float32"][path]
            print(f"val loss, {path.replace('_', ' ')}: " + ", ".join(
                f"{k} {v[path]:.4f} ({v[path] - ref:+.4f})" for k, v in losses.items()), flush=True)
    for preset in args.presets:
        model = build(preset, dtype)
        # a checkpoint of the plain model (a prepared one has fused matrices no checkpoint holds)
        started = startup(model, preset, args.dtype) if args.startup and preset != "havoc-2b" else None
        hf = to_llama(model)  # shares the weight tensors
        # inference modules; q/k/v and gate/up fused (copies of those matrices); prepacked for oneDNN as
        # `havoc serve` does (bf16 single rows never use the packed copy; fp32 ones do, as `havoc chat` of a
        # model under 50M parameters)
        prepare_model(model, dtype, pack=True)
        vocab = model.config.vocab_size
        row: dict = {"params": model.config.num_parameters()}
        bound = bandwidth * 1e9 / weight_bytes(model)
        # int8 matrices (and an int8 copy of the tied head); fp32 activations, as the CPU kernel takes
        int8 = prepare_model(copy.deepcopy(model), torch.float32, "int8") if args.int8 else None
        for batch in (1, 8):
            ids = prompts(batch, PROMPT_LEN, vocab)
            runs = {"havoc": partial(havoc_run, model), "hf": partial(hf_run, hf)}
            if int8 is not None:  # timed in the same rounds as the dtype it is compared with
                runs["havoc_int8"] = partial(havoc_run, int8)
            if args.compile:
                runs["havoc_compiled"] = partial(havoc_run, model, compile=True)
                runs["havoc_compiled"](ids, 2)  # compile outside the timed runs
            rates = decode_rates(runs, ids, args.tokens, args.repeat)
            ours, theirs = rates["havoc"], rates["hf"]
            if args.compile:
                c = rates["havoc_compiled"]
                print(f"{preset} {args.dtype} batch {batch}: HAVOC compiled {c:.1f} tok/s = {c / theirs:.2f}x "
                      "transformers", flush=True)
            row[f"b{batch}"] = {"havoc_tok_s": ours, "hf_tok_s": theirs, "ratio": ours / theirs,
                                **({"havoc_compiled_tok_s": rates["havoc_compiled"]} if args.compile else {}),
                                **({"havoc_int8_tok_s": rates["havoc_int8"]} if "havoc_int8" in rates else {})}
            print(f"{preset} {args.dtype} batch {batch}: HAVOC {ours:.1f} tok/s, transformers {theirs:.1f} tok/s, "
                  f"ratio {ours / theirs:.2f}x", flush=True)
            if "havoc_int8" in rates:
                print(f"{preset} int8 batch {batch}: HAVOC {rates['havoc_int8']:.1f} tok/s = "
                      f"{rates['havoc_int8'] / theirs:.2f}x transformers {args.dtype}", flush=True)
        row["b1"].update(bound_tok_s=bound, of_bound=row["b1"]["havoc_tok_s"] / bound,
                         hf_of_bound=row["b1"]["hf_tok_s"] / bound)
        print(f"{preset} bound {bound:.1f} tok/s: HAVOC at {row['b1']['of_bound']:.0%}, "
              f"transformers at {row['b1']['hf_of_bound']:.0%}", flush=True)
        long_ids = prompts(1, min(PREFILL_LEN, model.config.max_seq_len - 1), vocab)
        ours = havoc_prefill(model, long_ids, args.repeat)
        theirs = min(hf_run(hf, long_ids, 1) for _ in range(args.hf_prefill_repeat))
        row["prefill_512"] = {"havoc_s": ours, "hf_s": theirs, "ratio": theirs / ours}
        used = prefill_dtype(model.embed.weight.dtype, model.embed.weight.device)
        row["prefill_512"]["havoc_compute_dtype"] = str(used).replace("torch.", "")
        print(f"{preset} prefill {long_ids.shape[1]}: HAVOC {ours:.2f} s ({row['prefill_512']['havoc_compute_dtype']} "
              f"compute), transformers {theirs:.2f} s "
              f"({args.dtype}), {theirs / ours:.1f}x faster", flush=True)
        if started is not None:
            row["startup"] = s = started
            print(f"{preset} start -> You: HAVOC {s['havoc_s']:.2f} s, transformers load {s['hf_s']:.2f} s", flush=True)
        if int8 is not None:
            rate = row["b1"]["havoc_int8_tok_s"]
            bound8 = bandwidth * 1e9 / weight_bytes(int8)
            row["int8_b1"] = {"havoc_tok_s": rate, "vs_dtype": rate / row["b1"]["havoc_tok_s"],
                              "bound_tok_s": bound8, "of_bound": rate / bound8}
            print(f"{preset} int8 batch 1: {rate:.1f} tok/s = {row['int8_b1']['vs_dtype']:.2f}x {args.dtype} "
                  f"({rate / bound8:.0%} of its bound {bound8:.1f}; the same timing rounds)", flush=True)
            del int8
        results["presets"][preset] = row
    out = Path(__file__).parent / "results" / "decode.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
