"""Benchmark scoring speed: ``HavocLM`` (what ``havoc eval --tasks`` runs) vs lm-eval's ``hf`` model on
the ``havoc export`` of the same checkpoint: one local 4-choice task, same batch size and threads,
in one process, each side timed twice (best kept), scores checked equal.

    python bench/eval.py [--preset havoc-small] [--questions 64] [--batch-size 16] [--threads 2]
Results also go to bench/results/eval.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(var, "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from havoc_core import HavocModel, get_preset  # noqa: E402
from havoc_core.builtin_corpus import builtin_documents  # noqa: E402
from havoc_core.checkpoint import save_model  # noqa: E402
from havoc_core.hf import export  # noqa: E402
from havoc_core.lm_eval_model import HavocLM  # noqa: E402
from havoc_core.tokenizer import HavocTokenizer  # noqa: E402


def make_task(d: Path, docs: list[str], n: int) -> None:
    rng = random.Random(0)
    heads = [t.split("\n")[0][:60] for t in docs]
    with open(d / "mc.jsonl", "w") as f:
        for i in range(n):
            choices = rng.sample(heads[:i] + heads[i + 1:], 3)
            gold = rng.randrange(4)
            choices.insert(gold, heads[i])
            f.write(json.dumps({"passage": " ".join(docs[i].split()[:120]), "choices": choices, "gold": gold}) + "\n")
    (d / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{passage}}\\nTopic:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")


def timed(model: object, manager: TaskManager, **kw: object) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0, **kw)
    return time.perf_counter() - t0, out["results"]["bench_mc"]["acc,none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="havoc-small")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = [d for d in builtin_documents() if len(d.split()) > 150][: args.questions + 8]
    tok = HavocTokenizer.train(docs, vocab_size=8192, show_progress=False)
    cfg = dataclasses.replace(get_preset(args.preset), vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = save_model(d / "ckpt", HavocModel(cfg).eval(), tokenizer=tok)
        hf_dir = export(ckpt, d / "hf")
        make_task(d, docs, args.questions)
        manager = TaskManager(include_path=str(d), include_defaults=False)
        ours_lm = HavocLM(checkpoint=str(ckpt), dtype="float32", batch_size=args.batch_size)
        from lm_eval.models.huggingface import HFLM
        theirs_lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
        runs: dict[str, list[float]] = {"havoc": [], "hf": []}
        accs = {}
        for _ in range(2):  # interleaved, best of two
            for name, lm in [("havoc", ours_lm), ("hf", theirs_lm)]:
                seconds, accs[name] = timed(lm, manager)
                runs[name].append(seconds)
    requests = 4 * args.questions
    best = {k: min(v) for k, v in runs.items()}
    result = {"preset": args.preset, "questions": args.questions, "requests": requests, "batch_size": args.batch_size,
              "threads": args.threads, "seconds": best, "requests_per_s": {k: requests / v for k, v in best.items()},
              "ratio_havoc_over_hf": best["hf"] / best["havoc"], "acc": accs}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
