"""Benchmark tasks scored during training (``eval_tasks``): a real tokenizer, real shards, a tiny
model trained for real steps, the built-in havoc-docs task and a local lm-eval YAML task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from havoc_core.errors import ConfigError
from havoc_core.eval_tasks import TaskRun, run_tasks
from havoc_core.metrics import read_metrics, read_task_scores
from havoc_core.train import run_training
from havoc_core.train_config import TrainConfig

pytest.importorskip("lm_eval")
for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_var, "1")


@pytest.fixture(scope="module")
def setup(topics, topic_choices, tmp_path_factory):
    """A 512-token tokenizer and shards from the pydoc topics, a tiny config, and a local 4-choice
    task (which topic a passage opens) as an lm-eval YAML file."""
    from havoc_core import AttentionConfig, HavocConfig, MLPConfig
    from havoc_core.prepare import prepare_pretrain
    from havoc_core.tokenizer import HavocTokenizer

    root = tmp_path_factory.mktemp("train_eval")
    tok = HavocTokenizer.train(topics, vocab_size=512, show_progress=False)
    tok.save(root / "tok")
    prepare_pretrain(topics, tok, root / "data")
    HavocConfig(vocab_size=tok.vocab_size, d_model=64, num_layers=2, max_seq_len=64,
                attention=AttentionConfig(num_heads=4, num_kv_heads=2), mlp=MLPConfig(hidden_dim=128),
                dropout=0.1).save(root / "tiny.json")
    topic_choices(root / "mc.jsonl", items=12, words=(5, 25), head=40)
    (root / "topic.yaml").write_text(
        f"task: topic\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{passage}}\\nTopic:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    return root


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(phase="pretrain", init=str(root / "tiny.json"), data=str(root / "data"), tokenizer=str(root / "tok"),
                out_dir=str(out), max_steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=3,
                eval_batches=1, save_every=3, keep_last=5, eval_tasks=f"havoc-docs,{root / 'topic.yaml'}",
                eval_tasks_every=3, eval_tasks_limit=8)
    return TrainConfig(**{**base, **kw})


def test_scores_during_training_equal_havoc_eval_of_the_checkpoint_and_resume_continues(setup, tmp_path):
    run = tmp_path / "run"
    run_training(_cfg(setup, run), progress=False)
    scores = read_task_scores(run)
    assert set(scores) == {3, 6}
    assert set(scores[6]) == {"havoc-docs/acc", "havoc-docs/acc_mutual_info", "topic/acc"}
    # the weights scored at step 6 are the ones saved there: `havoc eval --tasks` gives the same numbers
    offline = run_tasks(str(run / "checkpoint_step_6"), TaskRun(
        ["havoc-docs", str(setup / "topic.yaml")], limit=8, batch_size=4))["results"]
    assert scores[6] == {f"{t}/{m}": v for t, ms in offline.items() for m, v in ms.items()
                         if isinstance(v, float) and not m.endswith("_stderr")}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tasks"]["topic"]["samples"] == 8 for r in records if "tasks" in r)

    from PIL import Image

    width_two_panels = Image.open(run / "loss.png").size[0]
    plain = tmp_path / "plain"
    run_training(_cfg(setup, plain, eval_tasks=""), progress=False)
    assert not read_task_scores(plain) and Image.open(plain / "loss.png").size[0] < 0.7 * width_two_panels
    # scoring leaves training as it was: dropout's random stream and the weights' mode included
    assert read_metrics(plain)[0][6]["loss"] == read_metrics(run)[0][6]["loss"]

    run_training(_cfg(setup, run, max_steps=9), resume=True, progress=False)
    assert set(read_task_scores(run)) == {3, 6, 9} and read_task_scores(run)[6] == scores[6]


def test_bad_eval_tasks_fail_before_the_first_step(setup, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="eval_tasks: unknown task 'no_such_task'"):
        run_training(_cfg(setup, out, eval_tasks="no_such_task"), progress=False)
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such task file"):
        run_training(_cfg(setup, out, eval_tasks=str(tmp_path / "missing.yaml")), progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="eval_tasks: not with fsdp=true"):
        _cfg(setup, out, fsdp=True).validate()
    proc = subprocess.run([sys.executable, "-m", "havoc_core.cli", "pretrain", "--init", str(setup / "tiny.json"),
                           "--data", str(setup / "data"), "--out-dir", str(out), "--eval-tasks", "havoc-docs",
                           "--eval-tasks-every", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("eval_tasks_every: expected a positive integer, found 0")
