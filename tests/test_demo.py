"""The demo pipeline end to end, shrunk: built-in corpus -> tokenizer -> shards -> pretrain -> SFT -> answers."""

import subprocess
import sys
from pathlib import Path

from havoc_core.checkpoint import list_checkpoints
from havoc_core.demo import DEMO_QUESTIONS, DemoPlan, run_demo


def test_demo_pipeline_end_to_end_then_reuse(tmp_path, capsys):
    plan = DemoPlan(data_dir=str(tmp_path / "data"), pretrain_dir=str(tmp_path / "pre"), sft_dir=str(tmp_path / "sft"),
                    vocab_size=1024, pretrain_steps=4, pretrain_batch=2, pretrain_seq_len=64, sft_steps=2,
                    sft_batch=2)
    assert run_demo(plan, interactive=False) == 0
    out = capsys.readouterr().out
    for q in DEMO_QUESTIONS:
        assert f"You: {q}\nHAVOC: " in out
    assert [p.name for p in list_checkpoints(plan.sft_dir)][-1] == "checkpoint_step_2"
    # a second run reuses every stage: same checkpoints, same (greedy) answers
    assert run_demo(plan, interactive=False) == 0
    again = capsys.readouterr()
    assert again.out == out and "pretraining" not in again.err and "tokenizer" not in again.err
    assert "havoc-docs: " in out and (Path(plan.sft_dir) / "demo_score.json").is_file()  # scored once, printed twice

    # the user's own command: `python test_chat.py CKPT` loads it and answers 3 test prompts (havoc smoke)
    root = Path(__file__).resolve().parents[1]
    smoke = subprocess.run([sys.executable, str(root / "test_chat.py"), plan.sft_dir], capture_output=True,
                           text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr
    assert smoke.stdout.count("\nHAVOC: ") == 3 and "smoke test passed" in smoke.stdout, smoke.stdout
