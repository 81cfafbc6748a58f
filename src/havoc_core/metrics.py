"""Run metrics: ``metrics.jsonl`` (one JSON record per step), ``loss.png``, and the peak FLOP/s that
MFU is measured against."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from havoc_core.errors import HavocError

METRICS_FILE = "metrics.jsonl"
_PEAK_CACHE: dict[str, float] = {}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}

def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Dense peak FLOP/s used for MFU: a table for known GPUs (bf16), else this CPU's matmul FLOP/s in
    ``dtype`` measured once on a 1024^3 product (this machine: ~180 GFLOP/s fp32, ~420 bf16, 2 cores)."""
    key = f"{device}/{dtype}"
    if key not in _PEAK_CACHE:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            _PEAK_CACHE[key] = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 312e12)
        else:  # best of 5 short trials: a busy moment (e.g. tokenizer threads winding down) can't deflate it
            # its own generator: drawing from the global one would shift dropout's stream in the first
            # run of a process only, and in a resumed run after its RNG state was restored
            gen = torch.Generator().manual_seed(0)
            a, b = (torch.randn(1024, 1024, generator=gen).to(dtype) for _ in range(2))
            a @ b
            best = 0.0
            for _ in range(5):
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 0.08:
                    a @ b
                    n += 1
                best = max(best, 2 * 1024**3 * n / (time.perf_counter() - t0))
            _PEAK_CACHE[key] = best
    return _PEAK_CACHE[key]



def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one record to the run's metrics.jsonl (appended: a resumed run re-writes later steps)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """Last training record and val loss per step (a resumed run re-writes later steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise HavocError(f"{path}: no metrics yet (train first)")
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "tasks" in rec:
            continue
        if "val_loss" in rec and "loss" not in rec:
            val[rec["step"]] = rec["val_loss"]
        else:
            train[rec["step"]] = rec
    return train, val


def read_task_scores(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """``{step: {"task/metric": value}}`` from the run's ``eval_tasks`` records (stderrs left out);
    the last record of a step wins, as a resumed run re-scores the steps after its checkpoint."""
    path = Path(run_dir) / METRICS_FILE
    scores: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "tasks" in rec:
                scores[rec["step"]] = headline(rec["tasks"])
    return scores


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"task/metric": value}`` of ``havoc eval --tasks`` results: the scores, without their
    stderrs and sample counts."""
    return {f"{task}/{name}": value for task, metrics in results.items() for name, value in metrics.items()
            if isinstance(value, float) and not name.endswith("_stderr")}


def plot_run(run_dir: str | Path) -> Path:
    """Write ``loss.png`` beside the run: train and validation loss against step, and the benchmark
    scores (``eval_tasks``) in a second panel when the run has them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HavocError("plotting needs matplotlib: pip install 'havoc[train]'") from None
    train, val = read_metrics(run_dir)
    scores = read_task_scores(run_dir)
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(13 if scores else 7, 4), squeeze=False)
    ax = axes[0][0]
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train", lw=1)
    if val:
        vs = sorted(val)
        ax.plot(vs, [val[s] for s in vs], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:  # the second panel: benchmark scores (eval_tasks) against the same steps
        right, steps_scored = axes[0][1], sorted(scores)
        for key in sorted({k for s in scores.values() for k in s}):
            xs = [s for s in steps_scored if key in scores[s]]
            right.plot(xs, [scores[s][key] for s in xs], "o-", label=key)
        right.set_xlabel("step")
        right.set_ylabel("score")
        right.set_title("eval_tasks")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
