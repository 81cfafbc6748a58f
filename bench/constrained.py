"""What JSON-schema decoding and logprobs cost: generated tokens/s of the engine with a schema
enforced (llguidance's mask every step) and with ``logprobs=5``, as ratios to plain decoding of the
same prompts in the same run, at batch 1 and 8 (what 1 and 8 clients of ``havoc serve`` get).

    python bench/constrained.py [--preset havoc-tiny] [--tokens 128] [--rounds 3]

Random weights: a schema of at least 100 records keeps each reply going to the token limit (so
the batch stays full, as in the plain modes); tokens/s counts the tokens actually generated.
Results also go to bench/results/constrained.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from havoc_core import HavocModel, get_preset
from havoc_core.builtin_corpus import builtin_documents
from havoc_core.engine import Engine
from havoc_core.inference import prepare_model
from havoc_core.sampling import SamplingParams
from havoc_core.tokenizer import HavocTokenizer

RECORDS = {"type": "array", "minItems": 100, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "id": {"type": "integer"},
    "kind": {"enum": ["module", "function", "class"]}}, "required": ["name", "id", "kind"],
    "additionalProperties": False}}


def tokens_per_s(engine: Engine, prompts: list[str], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    done = engine.generate(prompts, params)
    return sum(len(c.ids) for c in done) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="havoc-tiny")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each mode is kept")
    args = p.parse_args()

    cfg = get_preset(args.preset)
    docs = builtin_documents()
    tok = HavocTokenizer.train(docs[:400], vocab_size=cfg.vocab_size, show_progress=False)
    torch.manual_seed(0)
    model = prepare_model(HavocModel(cfg).eval())
    base = SamplingParams(max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, seed=0)
    modes = {"plain": SamplingParams(**{**base.__dict__, "ignore_eos": True}),
             "json_schema": SamplingParams(**{**base.__dict__, "json_schema": RECORDS}),
             "logprobs_5": SamplingParams(**{**base.__dict__, "ignore_eos": True, "logprobs": 5})}
    results: dict[str, dict[str, float]] = {}
    for batch in (1, 8):
        engine = Engine(model, tok, max_batch=batch)
        prompts = [d[:200] for d in docs[:batch]]
        engine.generate(prompts, modes["json_schema"])  # warm-up: kernels, the grammar's token table
        best = dict.fromkeys(modes, 0.0)
        for _ in range(args.rounds):
            for name, params in modes.items():
                best[name] = max(best[name], tokens_per_s(engine, prompts, params))
        results[f"batch_{batch}"] = {**{f"{k}_tok_s": round(v, 1) for k, v in best.items()},
                                     "json_schema_ratio": round(best["json_schema"] / best["plain"], 3),
                                     "logprobs_5_ratio": round(best["logprobs_5"] / best["plain"], 3)}
    report = {"preset": args.preset, "tokens": args.tokens, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "results": results}
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "constrained.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
