"""``make demo`` / ``havoc demo``: the whole pipeline on the built-in corpus, no network, no flags.

corpus -> BPE tokenizer -> token shards -> pretrain havoc-tiny -> SFT on generated conversations
-> chat. Every stage is skipped when its output already exists (an interrupted stage resumes), so
re-running goes straight to the chat. Sized to finish in about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from havoc_core.builtin_corpus import builtin_documents
from havoc_core.chat import answer_questions, run_chat
from havoc_core.checkpoint import RUN_DIRS, list_checkpoints, step_of
from havoc_core.data import MANIFEST, prepare_pretrain
from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer
from havoc_core.train import run_training
from havoc_core.train_config import TrainConfig

DEMO_QUESTIONS = [
    "What does the len function do?",
    "Explain the with statement.",
    "What is a list comprehension?",
]


@dataclass
class DemoPlan:
    """The demo's sizes; tests shrink them."""

    data_dir: str = "data/demo"
    pretrain_dir: str = RUN_DIRS["pretrain"]
    sft_dir: str = RUN_DIRS["sft"]
    preset: str = "havoc-tiny"
    vocab_size: int = 8192
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_seq_len: int = 256
    sft_steps: int = 150
    sft_batch: int = 8
    lr: float = 2e-3
    sft_lr: float = 5e-4
    eval_every: int = 100


def _stage(name: str) -> float:
    print(f"\n=== demo: {name} ===", file=sys.stderr, flush=True)
    return time.perf_counter()


def _finished(run_dir: str, steps: int) -> bool:
    ckpts = list_checkpoints(run_dir)
    return bool(ckpts) and step_of(ckpts[-1]) == steps


class Interrupted(Exception):
    """Ctrl-C during a training stage: its checkpoint is saved; the next run resumes it."""


def _train(cfg: TrainConfig) -> None:
    if run_training(cfg, resume=True).get("interrupted"):
        raise Interrupted


def build(plan: DemoPlan) -> Path:
    """Run (or reuse) every stage; return the SFT checkpoint dir."""
    data = Path(plan.data_dir)
    tok_dir, shards = data / "tokenizer", data / "pretrain"
    docs = None
    if not (tok_dir / TOKENIZER_FILE).is_file():
        t0 = _stage("building the corpus from Python's own documentation")
        docs = builtin_documents()
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
        prepare_pretrain(docs if docs is not None else builtin_documents(), tok, shards)
    if not _finished(plan.pretrain_dir, plan.pretrain_steps):
        _stage(f"pretraining {plan.preset} for {plan.pretrain_steps} steps")
        _train(TrainConfig(
            phase="pretrain", init=plan.preset, data=str(shards), tokenizer=str(tok_dir), out_dir=plan.pretrain_dir,
            max_steps=plan.pretrain_steps, batch_size=plan.pretrain_batch, seq_len=plan.pretrain_seq_len,
            lr=plan.lr, warmup_steps=max(1, plan.pretrain_steps // 20), eval_every=plan.eval_every,
            save_every=plan.eval_every, eval_batches=4))
    if not _finished(plan.sft_dir, plan.sft_steps):
        _stage(f"supervised fine-tuning on generated conversations for {plan.sft_steps} steps")
        _train(TrainConfig(
            phase="sft", init=plan.pretrain_dir, out_dir=plan.sft_dir, max_steps=plan.sft_steps,
            batch_size=plan.sft_batch, lr=plan.sft_lr, warmup_steps=max(1, plan.sft_steps // 20),
            eval_every=plan.eval_every, save_every=plan.eval_every, eval_batches=4, skip_invalid=True))
    return list_checkpoints(plan.sft_dir)[-1]


def run_demo(plan: DemoPlan | None = None, interactive: bool | None = None) -> int:
    plan = plan or DemoPlan()
    t0 = time.perf_counter()
    try:
        ckpt = build(plan)
    except Interrupted:
        print("demo interrupted; run it again to resume where it stopped", file=sys.stderr)
        return 130
    print(f"\ndemo model ready: {ckpt} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if interactive if interactive is not None else sys.stdin.isatty():
        return run_chat(str(ckpt))
    for question, answer in zip(DEMO_QUESTIONS, answer_questions(str(ckpt), DEMO_QUESTIONS), strict=True):
        print(f"You: {question}\nHAVOC: {answer}\n")
    return 0
