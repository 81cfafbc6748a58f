"""Training: a real tokenizer, real shards, a real tiny model trained for real steps."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from havoc_core import AttentionConfig, HavocConfig, HavocError, HavocModel, MLPConfig
from havoc_core.batches import SFTBatches
from havoc_core.checkpoint import list_checkpoints, save_model
from havoc_core.metrics import read_metrics
from havoc_core.model import IGNORE_INDEX, load_model
from havoc_core.train import run_training
from havoc_core.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def topics_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A 512-token BPE tokenizer trained on pydoc topics, the same text as shards, and a tiny config."""
    from havoc_core.prepare import prepare_pretrain
    from havoc_core.tokenizer import HavocTokenizer

    root = tmp_path_factory.mktemp("prepared")
    tok = HavocTokenizer.train(topics_text(), vocab_size=512, show_progress=False)
    tok.save(root / "tok")
    prepare_pretrain(topics_text(), tok, root / "data")
    cfg = HavocConfig(vocab_size=tok.vocab_size, d_model=64, num_layers=2, max_seq_len=64,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2), mlp=MLPConfig(hidden_dim=128))
    cfg.save(root / "tiny.json")
    cfg.dropout = 0.1  # resume must also continue dropout's random stream
    cfg.save(root / "tiny_dropout.json")
    return root


def pretrain_cfg(prepared, out, **kw) -> TrainConfig:
    base = dict(phase="pretrain", init=str(prepared / "tiny.json"), data=str(prepared / "data"),
                tokenizer=str(prepared / "tok"), out_dir=str(out), max_steps=8, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, keep_last=5)
    return TrainConfig(**{**base, **kw})


def losses(run_dir) -> dict[int, float]:
    train, _ = read_metrics(run_dir)
    return {s: r["loss"] for s, r in train.items()}


def test_pretrain_learns_and_writes_a_complete_run(prepared, tmp_path):
    run = tmp_path / "run"
    last = run_training(pretrain_cfg(prepared, run, max_steps=40, eval_every=20, save_every=20, keep_last=1),
                        progress=False)
    train, val = read_metrics(run)
    first, final = sum(train[s]["loss"] for s in range(1, 6)) / 5, sum(train[s]["loss"] for s in range(36, 41)) / 5
    assert final < first - 0.5, (first, final)
    assert set(val) == {20, 40} and last["val_loss"] == val[40]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint_step_40"]  # keep_last=1
    ckpt = run / "checkpoint_step_40"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["phase"] == "pretrain" and state["tokens_seen"] == 40 * 4 * 32
    assert TrainConfig(**state["train_config"]) == pretrain_cfg(
        prepared, run, max_steps=40, eval_every=20, save_every=20, keep_last=1)
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "optimizer.pt").is_file()
    assert (run / "loss.png").stat().st_size > 1000
    load_model(ckpt)  # loadable with nothing but the path


def test_resume_with_changed_model_config_is_refused(prepared, tmp_path):
    run_training(pretrain_cfg(prepared, tmp_path / "run", max_steps=4), progress=False)
    changed = HavocConfig.load(prepared / "tiny.json")
    changed.mlp.hidden_dim = 96
    changed.save(tmp_path / "changed.json")
    with pytest.raises(HavocError, match=r"cannot resume with a changed model config \(mlp.hidden_dim: 128 vs 96\)"):
        run_training(pretrain_cfg(prepared, tmp_path / "run", init=str(tmp_path / "changed.json")), resume=True)


def test_sft_loss_mask_gives_exactly_zero_gradient(prepared):
    """Positions whose target is masked (system/user tokens, padding) get exactly zero gradient."""
    from havoc_core.tokenizer import HavocTokenizer, render_chat

    tok = HavocTokenizer.load(prepared / "tok")
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is len?"},
              {"role": "assistant", "content": "The length of an object."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
              {"role": "user", "content": "What is a tuple?"},
              {"role": "assistant", "content": "An immutable sequence."}]]
    examples = [render_chat(tok, c) for c in convs]
    x, y = SFTBatches(examples, tok.pad_id, seed=0).rows(0, range(2), 2)
    model = HavocModel(HavocConfig.load(prepared / "tiny.json"))
    grads = {}

    def capture(module, inputs, out) -> None:
        out.register_hook(lambda g: grads.setdefault("h", g))

    model.norm.register_forward_hook(capture)
    model(x, y).backward()
    g = grads["h"].abs().sum(-1)  # gradient reaching each position's final hidden state
    masked = y == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.all(g[masked] == 0) and torch.all(g[~masked] > 0)
    # and the unmasked targets are exactly the assistant tokens (+ their closing eos) of every turn
    for (ids, mask), row in zip(examples, y, strict=True):
        expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert row[: len(ids) - 1].tolist() == expected


def test_sft_end_to_end_from_a_pretrain_checkpoint(prepared, tmp_path):
    from havoc_core.data import write_jsonl

    run_training(pretrain_cfg(prepared, tmp_path / "pre", max_steps=4), progress=False)
    convs = [{"messages": [{"role": "user", "content": f"What is {w}?"},
                           {"role": "assistant", "content": f"{w} is a Python keyword."}]}
             for w in ["for", "while", "def", "class", "return", "yield", "lambda", "with"] * 4]
    write_jsonl(convs, tmp_path / "convs.jsonl")
    last = run_training(TrainConfig(phase="sft", init=str(tmp_path / "pre"), data=str(tmp_path / "convs.jsonl"),
                                    out_dir=str(tmp_path / "sft"), max_steps=30, batch_size=4, lr=3e-3,
                                    warmup_steps=2, eval_every=30, eval_batches=1, save_every=30), progress=False)
    train, _ = read_metrics(tmp_path / "sft")
    assert train[30]["loss"] < train[1]["loss"] - 1.0
    assert last["step"] == 30 and load_model(tmp_path / "sft").config == load_model(tmp_path / "pre").config


def test_sft_tokenizer_mismatch_is_refused(prepared, tmp_path):
    from havoc_core.tokenizer import HavocTokenizer

    other = HavocTokenizer.train(topics_text()[:50], vocab_size=400, show_progress=False)
    other.save(tmp_path / "other")
    run_training(pretrain_cfg(prepared, tmp_path / "pre", max_steps=2), progress=False)
    with pytest.raises(HavocError, match="vocab"):
        run_training(TrainConfig(phase="sft", init=str(tmp_path / "pre"), tokenizer=str(tmp_path / "other"),
                                 out_dir=str(tmp_path / "sft"), max_steps=2))


def test_pretrain_data_made_with_another_tokenizer_is_refused(prepared, tmp_path):
    """Same vocab size, different merges: the shards' ids would be silent garbage for this model."""
    from havoc_core.tokenizer import HavocTokenizer

    other = HavocTokenizer.train(topics_text()[:40], vocab_size=512, show_progress=False)
    other.save(tmp_path / "other")
    with pytest.raises(HavocError, match="manifest.json: tokenizer_hash: the shards were made with tokenizer"):
        run_training(pretrain_cfg(prepared, tmp_path / "run", tokenizer=str(tmp_path / "other")), progress=False)


# --------------------------------------------------------------------------- CLI and bad input

def havoc(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "havoc_core.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


@pytest.mark.parametrize("content,expect", [
    ("max_steps = 10\nlearning_rate = 0.1\n", "learning_rate: unknown key"),
    ("max_steps = -1\n", "max_steps: expected a positive integer, found -1"),
    ("lr = 'fast'\n", 'lr: expected a number, found "fast"'),
    ("beta2 = 1.5\n", "beta2: expected a number in [0, 1], found 1.5"),
    ("max_steps = 10\n[[oops\n", "cannot parse"),
])
def test_bad_train_config_is_one_line_before_training(tmp_path, content, expect):
    (tmp_path / "train.toml").write_text(content)
    out = havoc("pretrain", "--config", str(tmp_path / "train.toml"), "--out-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and expect in out.stderr and "train.toml" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_missing_data_path_is_one_line(prepared, tmp_path):
    out = havoc("pretrain", "--init", str(prepared / "tiny.json"), "--data", str(tmp_path / "nope"),
                "--tokenizer", str(prepared / "tok"), "--out-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "nope" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cli_pretrain_eval_plot(prepared, tmp_path):
    run = tmp_path / "run"
    out = havoc("pretrain", "--init", str(prepared / "tiny.json"), "--data", str(prepared / "data"),
                "--out-dir", str(run), "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
                "--eval-every", "3", "--eval-batches", "1")
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stderr and "tok/s" in out.stderr
    out = havoc("eval", str(run), "--data", str(prepared / "data"), "--max-batches", "2")
    assert out.returncode == 0, out.stderr
    loss = float(out.stdout.split("val loss ")[1].split()[0])
    assert 0 < loss < 10 and "bits per byte" in out.stdout
    (run / "loss.png").unlink()
    assert havoc("plot", str(run)).returncode == 0 and (run / "loss.png").is_file()


def _wait_for(path: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _train_cmd(prepared, run, steps: int, *extra: str, init: str = "tiny.json") -> list[str]:
    return [sys.executable, "-m", "havoc_core.cli", "pretrain", "--init", str(prepared / init),
            "--data", str(prepared / "data"), "--tokenizer", str(prepared / "tok"), "--out-dir", str(run),
            "--max-steps", str(steps), "--batch-size", "2", "--seq-len", "32", "--save-every", "1",
            "--keep-last", "100", "--eval-every", "1000", *extra]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ctrl_c_saves_then_resume_continues_exactly(prepared, tmp_path, optimizer):
    """Ctrl-C mid-run saves and exits cleanly; --resume then gives the same losses and weights,
    bit for bit, as an uninterrupted run (same schedule, data order, RNG: the model has dropout;
    optimizer state: AdamW's moments, or Muon's momentum and AdamW's)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    opt = ("--optimizer", optimizer)
    out = subprocess.run(_train_cmd(prepared, straight, 30, *opt, init="tiny_dropout.json"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    proc = subprocess.Popen(_train_cmd(prepared, split, 30, *opt, init="tiny_dropout.json"), stderr=subprocess.PIPE,
                            text=True)
    _wait_for(split / "checkpoint_step_3")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    step = int(list_checkpoints(split)[-1].name.rsplit("_", 1)[1])
    assert 3 <= step < 30 and max(read_metrics(split)[0]) == step  # the saved step is the last one trained
    out = subprocess.run(_train_cmd(prepared, split, 30, "--resume", *opt, init="tiny_dropout.json"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"at step {step}" in out.stderr, out.stderr
    assert losses(split) == losses(straight) and len(losses(straight)) == 30
    a, b = load_model(straight).state_dict(), load_model(split).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_at_ten_random_moments_then_resume_is_bit_exact(prepared, tmp_path):
    """SIGKILL at 10 seeded random moments of a run that saves every step (so most land inside a
    save: the weights, the optimizer write, the renames): after each, every checkpoint present
    loads, and resuming to the end gives the weights and final loss of a run never killed, bit for
    bit (the model has dropout, so the RNG state must survive too)."""
    steps, rng = 60, random.Random(0)
    cmd = partial(_train_cmd, prepared, steps=steps, init="tiny_dropout.json")
    straight, run = tmp_path / "straight", tmp_path / "run"
    subprocess.run(cmd(straight), check=True, capture_output=True, timeout=600)

    def newest() -> str:  # by step, not by count
        return list_checkpoints(run)[-1].name if list_checkpoints(run) else ""

    def next_save(after: str) -> str:
        t0 = time.time()
        while newest() == after and time.time() - t0 < 120:
            time.sleep(0.002)
        return newest()

    for _ in range(10):
        proc = subprocess.Popen(cmd(run) + ["--resume"], stderr=subprocess.DEVNULL)
        # two saves give this machine's step time; the kill lands within the next ~2 steps, at any speed
        first = next_save(newest())
        t1 = time.time()
        next_save(first)
        time.sleep(rng.uniform(0.0, 2 * (time.time() - t1)))
        proc.kill()
        proc.wait()
        assert list_checkpoints(run)[-1].name != f"checkpoint_step_{steps}", "killed too late: raise steps"
        for ckpt in list_checkpoints(run):
            load_model(ckpt)
            json.loads((ckpt / "trainer_state.json").read_text())
            torch.load(ckpt / "optimizer.pt", weights_only=True)
    last = int(newest().rsplit("_", 1)[1])
    out = subprocess.run(cmd(run) + ["--resume"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"at step {last}" in out.stderr, out.stderr
    assert losses(run)[steps] == losses(straight)[steps]
    a = load_model(straight / f"checkpoint_step_{steps}").state_dict()
    b = load_model(run / f"checkpoint_step_{steps}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_ddp_matches_single_process(prepared, tmp_path):
    """2 gloo ranks x batch 2 == 1 process x batch 4: same losses, identical weights on both ranks."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--init", str(prepared / "tiny.json"), "--data", str(prepared / "data"), "--tokenizer",
              str(prepared / "tok"), "--max-steps", "4", "--seq-len", "32", "--eval-every", "4", "--eval-batches", "1",
              "--save-every", "4", "--no-compile", "--dtype", "float32"]  # fp32: a 1e-4 match, not bf16 rounding
    out = havoc("pretrain", *common, "--batch-size", "4", "--out-dir", str(single))
    assert out.returncode == 0, out.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*torchrun, "-m", "havoc_core.cli", "pretrain", *common, "--batch-size", "2",
                          "--out-dir", str(ddp)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    assert "weights identical on all 2 ranks" in out.stderr  # bit-pattern checksum, all-gathered
    ref, got = load_model(single).state_dict(), load_model(ddp).state_dict()
    assert all(torch.allclose(got[k], ref[k], atol=1e-4) for k in ref)


def test_torchrun_fsdp2_on_cpu_matches_single_process(prepared, tmp_path):
    """FSDP2 (fully_shard) over 2 gloo ranks: same losses as one process, a full checkpoint on rank 0."""
    common = ["--init", str(prepared / "tiny.json"), "--data", str(prepared / "data"), "--tokenizer",
              str(prepared / "tok"), "--max-steps", "3", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1",
              "--save-every", "3", "--dtype", "float32"]
    assert havoc("pretrain", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "single")).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run([*torchrun, "-m", "havoc_core.cli", "pretrain", *common, "--batch-size", "2", "--fsdp",
                          "--out-dir", str(tmp_path / "fsdp")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    ref, got = load_model(tmp_path / "single").state_dict(), load_model(tmp_path / "fsdp").state_dict()
    assert all(torch.allclose(got[k], ref[k], atol=1e-4) for k in ref)


def test_save_model_then_sft_init_from_checkpoint_dir(prepared, tmp_path):
    """A checkpoint without trainer_state (e.g. `havoc init`) is a valid SFT start."""
    from havoc_core.tokenizer import HavocTokenizer

    tok = HavocTokenizer.load(prepared / "tok")
    save_model(tmp_path / "init", HavocModel(HavocConfig.load(prepared / "tiny.json")), tokenizer=tok)
    from havoc_core.data import write_jsonl

    write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 8,
                tmp_path / "c.jsonl")
    last = run_training(TrainConfig(phase="sft", init=str(tmp_path / "init"), data=str(tmp_path / "c.jsonl"),
                                    out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=2, eval_every=2,
                                    eval_batches=1, save_every=2), progress=False)
    assert last["step"] == 2


def test_muon_trains_the_block_matrices_and_adamw_the_rest(prepared, tmp_path):
    """optimizer = "muon": the blocks' 2-D weights carry Muon's momentum, embeddings and norms
    AdamW's moments; it learns; resuming with the other optimizer, or with FSDP, is refused."""
    run = tmp_path / "run"
    run_training(pretrain_cfg(prepared, run, max_steps=40, eval_every=40, save_every=40, optimizer="muon"),
                 progress=False)
    train, _ = read_metrics(run)
    first, final = sum(train[s]["loss"] for s in range(1, 6)) / 5, sum(train[s]["loss"] for s in range(36, 41)) / 5
    assert final < first - 0.5, (first, final)
    state = torch.load(run / "checkpoint_step_40" / "optimizer.pt", weights_only=True)
    muon_state = [v for v in state["muon"]["state"].values()]
    adamw_state = [v for v in state["adamw"]["state"].values()]
    model = load_model(run)
    matrices = [n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    assert len(muon_state) == len(matrices) and all(set(v) == {"momentum_buffer"} for v in muon_state)
    assert len(adamw_state) == len(list(model.parameters())) - len(matrices)
    assert all({"exp_avg", "exp_avg_sq"} <= set(v) for v in adamw_state)
    with pytest.raises(HavocError, match="optimizer: trained with 'muon', resumed with 'adamw'"):
        run_training(pretrain_cfg(prepared, run, max_steps=50), resume=True, progress=False)
    with pytest.raises(HavocError, match="optimizer: muon is not supported with fsdp=true"):
        pretrain_cfg(prepared, run, optimizer="muon", fsdp=True).validate()
