"""``make demo`` / ``havoc demo``: the whole pipeline on the built-in corpus, no network, sized by time.

corpus -> BPE tokenizer -> token shards -> pretrain havoc-tiny -> SFT on generated conversations
-> a held-out score (``havoc-docs``) -> chat. Each training stage first runs its warm-up steps, measures
this machine's seconds per step, and fixes its step count so the whole demo fits ``--minutes`` (7); the
decision is written to the run (``demo_plan.json``) so a re-run or a resume keeps it. The warm-up's
learning rates do not depend on the step count, so a planned run equals one told its steps up front.
Every stage is skipped when its output already exists (an interrupted stage resumes).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from havoc_core.atomic import write_atomic
from havoc_core.builtin_corpus import builtin_documents
from havoc_core.chat import answer_questions, run_chat
from havoc_core.checkpoint import RUN_DIRS, list_checkpoints, step_of
from havoc_core.data import MANIFEST
from havoc_core.docs_task import docs_items, docs_scores
from havoc_core.errors import HavocError
from havoc_core.metrics import read_metrics
from havoc_core.model import HavocModel, load_model
from havoc_core.prepare import prepare_pretrain
from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer
from havoc_core.train import run_training
from havoc_core.train_config import TrainConfig

DEMO_QUESTIONS = [
    "What does the len function do?",
    "Explain the with statement.",
    "What is a list comprehension?",
]
PLAN_FILE = "demo_plan.json"
SCORE_FILE = "demo_score.json"  # in the SFT run dir: a re-run prints it instead of scoring again


@dataclass
class DemoPlan:
    """The demo's recipe and budget (docs/LOG.md says how it was chosen); tests shrink it.
    ``pretrain_steps`` / ``sft_steps`` 0 = planned from this machine's measured speed."""

    data_dir: str = "data/demo"
    pretrain_dir: str = RUN_DIRS["pretrain"]
    sft_dir: str = RUN_DIRS["sft"]
    preset: str = "havoc-tiny"
    vocab_size: int = 4096  # half the 8k head's FLOPs: 1.5x the steps, 61.5% vs 43.6% (docs/LOG.md)
    minutes: float = 7.0  # compute, corpus to answers (docs/LOG.md 2026-12-03: 5 minutes knew too little)
    sft_share: float = 0.25  # of the training time
    reserve_share: float = 0.15  # of the budget, for the score (2 models x 452 questions) and the answers
    warmup_steps: int = 20  # measured before the step count is fixed
    pretrain_steps: int = 0
    # small batches, many steps: at a fixed time 4 x 256 learns more than 16 x 256 (AVX2 EPYC:
    # 58.0% vs 38.3%, docs/LOG.md 2026-12-04)
    pretrain_batch: int = 4
    pretrain_seq_len: int = 256
    sft_steps: int = 0
    sft_batch: int = 4
    lr: float = 2e-3
    sft_lr: float = 5e-4
    optimizer: Literal["adamw", "muon"] = "adamw"
    max_steps: int = 5000

    def validate(self) -> DemoPlan:
        if not 0.5 <= self.minutes <= 24 * 60:
            raise HavocError(f"--minutes: expected a number of minutes in [0.5, 1440], found {self.minutes}")
        return self


def _stage(name: str) -> float:
    print(f"\n=== demo: {name} ===", file=sys.stderr, flush=True)
    return time.perf_counter()


def _finished(run_dir: str, steps: int) -> bool:
    ckpts = list_checkpoints(run_dir)
    return bool(ckpts) and step_of(ckpts[-1]) == steps


def _recorded_steps(run_dir: str, fixed: int) -> int:
    """The step count ``demo_plan.json`` recorded for this run, else ``fixed`` (0: not planned yet)."""
    path = Path(run_dir) / PLAN_FILE
    return int(json.loads(path.read_text())["steps"]) if path.is_file() else fixed


def _done(run_dir: str, fixed: int) -> bool:
    """The stage already reached its (fixed or recorded) step count: nothing to announce."""
    steps = _recorded_steps(run_dir, fixed)
    return bool(steps) and _finished(run_dir, steps)


class Interrupted(Exception):
    """Ctrl-C during a training stage: its checkpoint is saved; the next run resumes it."""


def _train(cfg: TrainConfig) -> None:
    if run_training(cfg, resume=True).get("interrupted"):
        raise Interrupted


def seconds_per_step(run_dir: str) -> float:
    """Median wall-clock time between consecutive logged steps, the first two (warm-up of the
    kernels and the data loader) left out."""
    train, _ = read_metrics(run_dir)
    times = [train[s]["time"] for s in sorted(train) if s > 2]
    deltas = [b - a for a, b in zip(times, times[1:], strict=False)]
    if not deltas:
        raise HavocError(f"{run_dir}: too few steps logged to measure the speed")
    return statistics.median(deltas)


def _plan_steps(name: str, run_dir: str, fixed: int, seconds: float, plan: DemoPlan,
                make: Any) -> int:
    """The stage's step count: from ``demo_plan.json`` if a run made one, else ``fixed``, else
    measured: train the warm-up steps, then as many more as fit in ``seconds``."""
    path = Path(run_dir) / PLAN_FILE
    if path.is_file():
        return _recorded_steps(run_dir, fixed)
    record: dict[str, Any] = {"stage": name, "budget_s": round(seconds, 1), "recipe": asdict(plan)}
    if fixed:
        steps = fixed
    else:
        _train(make(plan.warmup_steps))
        per_step = seconds_per_step(run_dir)
        steps = plan.warmup_steps + int(max(0.0, seconds - plan.warmup_steps * per_step) / per_step)
        steps = max(2 * plan.warmup_steps, min(plan.max_steps, steps))
        record["seconds_per_step"] = round(per_step, 4)
        print(f"{name}: {per_step:.2f} s/step measured -> {steps} steps in {seconds:.0f} s", file=sys.stderr)
    record["steps"] = steps
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return steps


def build(plan: DemoPlan, started: float | None = None) -> Path:
    """Run (or reuse) every stage; return the SFT checkpoint dir."""
    started = time.perf_counter() if started is None else started
    budget = plan.minutes * 60
    data = Path(plan.data_dir)
    tok_dir, shards = data / "tokenizer", data / "pretrain"
    docs = None
    if not (tok_dir / TOKENIZER_FILE).is_file():
        t0 = _stage("building the corpus from Python's own documentation")
        docs = builtin_documents(digest=True)
        print(f"{len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
        t0 = _stage(f"training a {plan.vocab_size:,}-token BPE tokenizer")
        tok = HavocTokenizer.train(docs, vocab_size=plan.vocab_size)
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok.save(tok_dir)
        print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tok = HavocTokenizer.load(tok_dir)
    if not (shards / MANIFEST).is_file():
        _stage("tokenizing the corpus into uint32 shards")
        prepare_pretrain(docs if docs is not None else builtin_documents(digest=True), tok, shards, resume=True)
    train_seconds = max(0.0, budget * (1 - plan.reserve_share) - (time.perf_counter() - started))

    def pretrain(steps: int) -> TrainConfig:
        return TrainConfig(phase="pretrain", init=plan.preset, data=str(shards), tokenizer=str(tok_dir),
                           out_dir=plan.pretrain_dir, max_steps=steps, batch_size=plan.pretrain_batch,
                           seq_len=plan.pretrain_seq_len, lr=plan.lr, warmup_steps=min(plan.warmup_steps, steps),
                           optimizer=plan.optimizer,
                           eval_every=steps, save_every=steps, eval_batches=4)

    def sft(steps: int) -> TrainConfig:
        return TrainConfig(phase="sft", init=plan.pretrain_dir, out_dir=plan.sft_dir, max_steps=steps,
                           batch_size=plan.sft_batch, lr=plan.sft_lr, warmup_steps=min(plan.warmup_steps, steps),
                           optimizer=plan.optimizer,
                           eval_every=steps, save_every=steps, eval_batches=4, skip_invalid=True)

    if not _done(plan.pretrain_dir, plan.pretrain_steps):
        _stage(f"pretraining {plan.preset}")
    steps = _plan_steps("pretraining", plan.pretrain_dir, plan.pretrain_steps, train_seconds * (1 - plan.sft_share),
                        plan, pretrain)
    if not _finished(plan.pretrain_dir, steps):
        _train(pretrain(steps))
    if not _done(plan.sft_dir, plan.sft_steps):
        _stage("supervised fine-tuning on generated conversations")
    sft_seconds = max(0.0, budget * (1 - plan.reserve_share) - (time.perf_counter() - started))
    steps = _plan_steps("fine-tuning", plan.sft_dir, plan.sft_steps, sft_seconds, plan, sft)
    if not _finished(plan.sft_dir, steps):
        _train(sft(steps))
    return list_checkpoints(plan.sft_dir)[-1]


def report_score(ckpt: Path) -> dict[str, dict[str, float]]:
    """havoc-docs on its held-out split, for the trained model and the same architecture untrained;
    computed once per checkpoint (``demo_score.json`` in its run dir), printed every run."""
    items = docs_items("test")
    path = Path(ckpt).parent / SCORE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("checkpoint") == Path(ckpt).name:
        scores = saved["scores"]
    else:
        tok = HavocTokenizer.load(ckpt)
        trained = load_model(ckpt).eval()
        torch.manual_seed(0)
        untrained = HavocModel(trained.config).eval()
        scores = {"trained": docs_scores(trained, tok, items), "untrained": docs_scores(untrained, tok, items)}
        write_atomic(path, json.dumps({"checkpoint": Path(ckpt).name, "scores": scores}, indent=2) + "\n")
    print(f"\nhavoc-docs: {len(items)} held-out questions \"What does `name` do?\", 4 choices (chance 25%)")
    for metric in ("acc_mutual_info", "acc"):
        print(f"  {metric:<16} trained {scores['trained'][metric]:6.1%}   untrained {scores['untrained'][metric]:6.1%}")
    print("  (acc_mutual_info: how much the name raises the right choice; docs/EVAL.md)", flush=True)
    return scores


def run_demo(plan: DemoPlan | None = None, interactive: bool | None = None) -> int:
    plan = (plan or DemoPlan()).validate()
    t0 = time.perf_counter()
    try:
        ckpt = build(plan, t0)
    except Interrupted:
        print("demo interrupted; run it again to resume where it stopped", file=sys.stderr)
        return 130
    print(f"\ndemo model ready: {ckpt} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    report_score(ckpt)
    if interactive if interactive is not None else sys.stdin.isatty():
        return run_chat(str(ckpt))
    for question, answer in zip(DEMO_QUESTIONS, answer_questions(str(ckpt), DEMO_QUESTIONS),
                                strict=True):
        print(f"You: {question}\nHAVOC: {answer}\n")
    print(f"demo done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
