"""``havoc eval CKPT --tasks ...``: benchmark scores of a checkpoint, offline first.

``havoc-docs`` is built in (``docs_task``) and needs nothing else. Every other task goes through
lm-evaluation-harness in-process with ``HavocLM`` (the optional ``havoc[eval]`` extra): its
registered tasks (HellaSwag, ARC, MMLU, ... once their datasets are in the local cache) and the
user's own YAML files. The Hugging Face libraries are held offline unless the user says otherwise,
so a missing dataset is a one-line error instead of a download or a hang.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from havoc_core.atomic import write_atomic
from havoc_core.checkpoint import step_of
from havoc_core.docs_task import docs_items, docs_scores
from havoc_core.errors import HavocError
from havoc_core.inference import load
from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer

BUILTIN_TASKS = ("havoc-docs",)
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
INSTALL_HINT = "pip install 'havoc[eval]' (lm-evaluation-harness)"
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


def task_list(text: str) -> list[str]:
    """``--tasks`` / ``eval_tasks``: comma-separated task names or YAML files."""
    return [t.strip() for t in text.split(",")]


@dataclass
class TaskRun:
    """What to run: the tasks and lm-eval's usual knobs."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 16
    include_path: list[str] = field(default_factory=list)
    apply_chat_template: bool = False
    dtype: str = "float32"  # scores that do not depend on whether this CPU has bf16
    device: str = "auto"

    def check(self) -> TaskRun:
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise HavocError(f"--tasks: expected comma-separated task names or YAML files, found {self.tasks!r}")
        if self.limit is not None and not (self.limit >= 1 and float(self.limit).is_integer() or 0 < self.limit < 1):
            raise HavocError(f"--limit: expected a count >= 1 or a fraction in (0, 1), found {self.limit:g}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise HavocError(f"--num-fewshot: expected an integer >= 0, found {self.num_fewshot}")
        if self.batch_size < 1:
            raise HavocError(f"--batch-size: expected an integer >= 1, found {self.batch_size}")
        for d in self.include_path:
            if not Path(d).is_dir():
                raise HavocError(f"--include-path: {d}: no such directory")
        return self

    @property
    def lm_tasks(self) -> list[str]:
        """The tasks lm-evaluation-harness runs (all but the built-in ones)."""
        return [t for t in self.tasks if t not in BUILTIN_TASKS]


@dataclass
class Tasks:
    """Tasks checked and ready to score any number of models (a training run scores one every
    ``eval_tasks_every`` steps): lm-eval and its task index are set up once."""

    run: TaskRun
    lm_eval: Any = None
    manager: Any = None

    @classmethod
    def prepare(cls, run: TaskRun) -> Tasks:
        run.check()
        if not run.lm_tasks:
            return cls(run)
        lm_eval = _import_lm_eval(run.lm_tasks)
        return cls(run, lm_eval, _task_manager(lm_eval, run.lm_tasks, run.include_path))

    def score(self, model: HavocModel, tokenizer: HavocTokenizer) -> dict[str, dict[str, Any]]:
        """``results[task][metric]`` (and ``metric_stderr``, ``samples``) of ``model``."""
        results: dict[str, dict[str, Any]] = {}
        if "havoc-docs" in self.run.tasks:
            items = docs_items("test")
            items = items[: _limit_count(self.run.limit, len(items))]
            scores = docs_scores(model, tokenizer, items)
            stderr = {f"{k}_stderr": math.sqrt(v * (1 - v) / max(1, len(items) - 1)) for k, v in scores.items()}
            results["havoc-docs"] = {**scores, **stderr, "samples": len(items)}  # lm-eval's stderr of a mean
        if self.run.lm_tasks:
            results.update(_run_lm_eval(self.lm_eval, self.manager, model, tokenizer, self.run.lm_tasks, self.run))
        return results


def run_tasks(checkpoint: str | None, run: TaskRun) -> dict[str, Any]:
    """Scores of every task in ``run`` on ``checkpoint``, as one JSON-ready dict:
    ``results[task][metric]`` (and ``metric_stderr``), the checkpoint, its step and config."""
    tasks = Tasks.prepare(run)  # before the model loads: a bad task name costs no loading time
    loaded = load(checkpoint, device=run.device, dtype=run.dtype)
    t0 = time.perf_counter()
    results = tasks.score(loaded.model, loaded.tokenizer)
    return {"checkpoint": str(loaded.path), "step": step_of(loaded.path), "config": loaded.model.config.to_dict(),
            "run": asdict(run), "seconds": round(time.perf_counter() - t0, 2), "results": results}


def _limit_count(limit: float | None, n: int) -> int:
    if limit is None:
        return n
    return int(limit) if limit >= 1 else max(1, math.ceil(limit * n))


def _import_lm_eval(tasks: Sequence[str]) -> Any:
    for var in OFFLINE_VARS:  # offline first: a user who wants downloads says so
        os.environ.setdefault(var, "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401

        import havoc_core.lm_eval_model  # noqa: F401  (registers "havoc")
    except ImportError as e:
        raise HavocError(f"--tasks {','.join(tasks)}: needs lm-evaluation-harness ({e.name} is missing): "
                         f"{INSTALL_HINT}; built in without it: {', '.join(BUILTIN_TASKS)}") from None
    return lm_eval


def _task_manager(lm_eval: Any, tasks: Sequence[str], include_path: Sequence[str]) -> Any:
    """lm-eval's task index, every task checked to exist (and YAML files to be complete) before any
    model is loaded. lm-eval's own index of ~15k tasks takes ~10 s: it is read only when a task
    is not one of the user's files."""
    from lm_eval.tasks import TaskManager

    files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for f in files:
        _check_task_file(Path(f))
    names = [t for t in tasks if t not in files]
    manager = TaskManager(include_path=list(include_path) or None, include_defaults=bool(names))
    for name in names:
        if name not in manager.all_tasks:
            raise HavocError(f"--tasks: unknown task {name!r} (list them with `lm_eval ls tasks`; a file of your own "
                             "ends in .yaml; built in: " + ", ".join(BUILTIN_TASKS) + ")")
    return manager


def _check_task_file(path: Path) -> None:
    """The fields lm-eval needs and otherwise fails on deep inside a run (often with an empty message)."""
    import yaml  # pyyaml arrives with the optional lm-eval extra

    if not path.is_file():
        raise HavocError(f"{path}: no such task file")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HavocError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise HavocError(f"{path}: expected a YAML mapping of task fields")
    from lm_eval.api.task import TaskConfig

    known = {f.name for f in fields(TaskConfig)} | {"include", "group", "tag"}
    for key in spec:
        if key not in known:
            raise HavocError(f"{path}: {key}: not a task field (lm-eval's TaskConfig has {', '.join(sorted(known))})")
    if "include" in spec:  # the base file supplies the rest: lm-eval merges them
        return
    required = ["task", "dataset_path", "output_type", "doc_to_text", "doc_to_target"]
    if spec.get("output_type") == "multiple_choice":
        required.append("doc_to_choice")
    for key in required:
        if key not in spec:
            raise HavocError(f"{path}: {key}: missing (a task needs {', '.join(required)})")
    if spec["output_type"] not in OUTPUT_TYPES:
        raise HavocError(f"{path}: output_type: expected one of {', '.join(OUTPUT_TYPES)}, "
                         f"found {spec['output_type']!r}")


def _run_lm_eval(lm_eval: Any, manager: Any, model: HavocModel, tokenizer: HavocTokenizer, tasks: list[str],
                 run: TaskRun) -> dict[str, dict[str, Any]]:
    from havoc_core.lm_eval_model import HavocLM  # it subclasses lm-eval's TemplateLM: an optional extra

    lm = HavocLM(model, tokenizer, batch_size=run.batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=run.num_fewshot, limit=run.limit, task_manager=manager,
            apply_chat_template=run.apply_chat_template, fewshot_as_multiturn=run.apply_chat_template,
            log_samples=False, bootstrap_iters=1000)
    except (ConnectionError, FileNotFoundError) as e:  # datasets' offline-mode and missing-file errors
        hint = "fetch it once with HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 (cached in ~/.cache/huggingface)"
        raise HavocError(f"--tasks {','.join(tasks)}: dataset not available offline ({_line(e)}); {hint}") from None
    results = {}
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue
            name = key.split(",")[0]
            row[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        row["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {k: (float(v) if isinstance(v, float) else v) for k, v in row.items()}
    return results


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def format_table(report: dict[str, Any]) -> str:
    """``task  metric  value  stderr`` lines, lm-eval's layout in plain text."""
    lines = [f"{'task':<24} {'metric':<22} {'value':>10} {'stderr':>8}"]
    for task, metrics in report["results"].items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name == "samples" or value is None:
                continue
            err = metrics.get(f"{name}_stderr")
            err_text = f"{err:.4f}" if isinstance(err, (int, float)) else ""
            lines.append(f"{task:<24} {name:<22} {value:>10.4f} {err_text:>8}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    return write_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
