"""One training loop for pretraining and SFT, from a laptop CPU to torchrun on many GPUs.

Data order is a pure function of ``(seed, step, global row index)`` (``batches``): resuming needs
only the step, plus model, optimizer and RNG states (for dropout).

Distributed runs go through ``torchrun`` only: DDP (gloo on CPU, NCCL on GPU) or FSDP2
(``fully_shard``) with ``fsdp = true``. Rank 0 logs and writes.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import math
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from havoc_core.batches import PretrainBatches, SFTBatches
from havoc_core.builtin_corpus import builtin_conversations
from havoc_core.checkpoint import (
    OPTIMIZER_FILE,
    RUN_DIRS,
    TRAINER_STATE_FILE,
    config_from_source,
    find_checkpoint,
    list_checkpoints,
    save_checkpoint,
    step_dir,
)
from havoc_core.config import PRESETS, HavocConfig, to_dict
from havoc_core.data import MANIFEST, load_conversations, read_manifest, tokenizer_hash
from havoc_core.distributed import Distributed
from havoc_core.errors import ConfigError, HavocError
from havoc_core.eval_tasks import TaskRun, Tasks, task_list
from havoc_core.evaluate import loss_sums
from havoc_core.metrics import append_metrics, headline, peak_flops, plot_run
from havoc_core.model import IGNORE_INDEX, HavocModel, load_model
from havoc_core.optim import make_optimizer
from havoc_core.precision import cpu_has_native_bf16, training_dtype
from havoc_core.tokenizer import HavocTokenizer
from havoc_core.train_config import TrainConfig

# --------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- helpers

def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(a: HavocConfig, b: HavocConfig) -> list[str]:
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return [f"{k}: {fa[k]} vs {fb[k]}" for k in fa if fa[k] != fb.get(k)]


# --------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg.validate()
        self.dist = Distributed()
        self.out_dir = Path(cfg.out_dir or RUN_DIRS[cfg.phase])
        self.progress = progress and self.dist.main
        device = self.dist.device

        # ---- model (and the step to continue from)
        self.step, self.tokens_seen, resume_state = 0, 0, None
        start = find_checkpoint(self.out_dir) if resume and list_checkpoints(self.out_dir) else None
        if resume and start is None:
            self.log(f"--resume: no checkpoint in {self.out_dir} yet, starting from {cfg.init}")
        tok_source = cfg.tokenizer or (str(find_checkpoint(cfg.init)) if Path(cfg.init).is_dir() else "") or (
            cfg.data if cfg.phase == "pretrain" else "")
        if not tok_source:
            raise HavocError("train config: tokenizer: expected a tokenizer dir or file (none in init/data)")
        self.tokenizer = HavocTokenizer.load(tok_source)
        init_cfg = self._init_config(cfg.init)
        if start is not None:
            model = load_model(start, device=device)
            diff = config_diff(model.config, init_cfg)
            if diff:
                raise HavocError(f"{start}: cannot resume with a changed model config ({'; '.join(diff)})")
            resume_state = json.loads((start / TRAINER_STATE_FILE).read_text())
            trained_with = resume_state.get("train_config", {}).get("optimizer", "adamw")
            if trained_with != cfg.optimizer:
                raise HavocError(f"{start}: optimizer: trained with {trained_with!r}, resumed with {cfg.optimizer!r} "
                                 "(its state cannot carry over; use the same, or start a new run)")
            self.step, self.tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        elif Path(cfg.init).is_dir():
            model = load_model(cfg.init, device=device)
        else:
            torch.manual_seed(cfg.seed)
            with device:
                model = HavocModel(init_cfg)
        self.model_config = model.config

        self.tokenizer.check_compatible(model.config)

        # ---- data
        seq_len = cfg.seq_len or model.config.max_seq_len
        if seq_len > model.config.max_seq_len:
            raise ConfigError(f"train config: seq_len: expected at most max_seq_len={model.config.max_seq_len}, "
                              f"found {seq_len}")
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        if cfg.phase == "pretrain":
            if not cfg.data:
                raise ConfigError("train config: data: expected a `havoc prepare` directory for pretraining")
            made_with, using = read_manifest(cfg.data).get("tokenizer_hash"), tokenizer_hash(self.tokenizer)
            if made_with != using:
                raise HavocError(f"{Path(cfg.data) / MANIFEST}: tokenizer_hash: the shards were made with tokenizer "
                                 f"{made_with}, training uses {using} ({tok_source}); re-run `havoc prepare`")
            self.train_data: Any = PretrainBatches(cfg.data, "train", seq_len, cfg.seed)
            self.val_data: Any = PretrainBatches(cfg.data, "val", seq_len, cfg.seed + 1)
        else:
            self.train_data, self.val_data = self._sft_data(model.config.max_seq_len)

        # ---- wrap: compile, DDP / FSDP
        self.raw_model = model
        self.compute_dtype = training_dtype(cfg.dtype, device)
        if device.type == "cpu" and not cpu_has_native_bf16():
            if self.compute_dtype == torch.bfloat16:
                self.log("warning: dtype bfloat16 on a CPU without native bf16: matmuls many times slower than fp32")
            if cfg.optimizer == "muon":  # torch.optim.Muon orthogonalises in bf16 (docs/LOG.md: 8x slower steps)
                self.log("warning: optimizer muon on a CPU without native bf16: its Newton-Schulz bf16 matmuls "
                         "are many times slower than fp32; adamw is faster here")
        self.amp = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if self.compute_dtype == torch.bfloat16 else nullcontext())
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard  # FSDP runs only: ~0.9 s of import time for every command

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        if cfg.compile:
            model = torch.compile(model)
        if self.dist.world > 1 and not cfg.fsdp:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = make_optimizer(self.raw_model, cfg.optimizer, cfg.lr, (cfg.beta1, cfg.beta2),
                                        cfg.weight_decay, fused=device.type == "cuda")
        if start is not None and resume_state is not None:
            self._load_optimizer(start)
            _set_rng_state(resume_state["rng"])
            self.log(f"resumed {start} at step {self.step}")
        self.peak = peak_flops(device, self.compute_dtype)
        self.tasks = None
        if cfg.eval_tasks:  # checked (names, files, lm-eval installed) before the first step, not at step 500
            run = TaskRun(task_list(cfg.eval_tasks), limit=cfg.eval_tasks_limit or None,
                          batch_size=cfg.batch_size)
            try:
                self.tasks = Tasks.prepare(run)
            except HavocError as e:
                raise ConfigError(f"train config: eval_tasks: {str(e).removeprefix('--tasks: ')}") from None
        self._stop = False

    # ------------------------------------------------------------------ setup helpers
    def log(self, msg: str) -> None:
        if self.dist.main:
            tqdm.write(msg, file=sys.stderr)

    def _init_config(self, init: str) -> HavocConfig:
        """The model config to start from: a checkpoint's, a config.json's, or a preset's (whose
        vocab_size follows the tokenizer, said out loud)."""
        cfg = config_from_source(init)
        if init in PRESETS and self.tokenizer.vocab_size != cfg.vocab_size:
            self.log(f"{init}: vocab_size set to {self.tokenizer.vocab_size} to match the tokenizer")
            cfg = dataclasses.replace(cfg, vocab_size=self.tokenizer.vocab_size)
        return cfg

    def _sft_data(self, max_len: int) -> tuple[SFTBatches, SFTBatches]:
        if self.cfg.data:
            if not Path(self.cfg.data).is_file():
                raise HavocError(f"{self.cfg.data}: no such conversations file")
            examples = load_conversations(self.cfg.data, self.tokenizer, max_len, skip_invalid=self.cfg.skip_invalid)
        else:
            examples = load_conversations(builtin_conversations(), self.tokenizer, max_len,
                                          skip_invalid=self.cfg.skip_invalid)
        order = np.random.default_rng(self.cfg.seed).permutation(len(examples))
        n_val = min(len(examples) // 10, self.cfg.eval_batches * self.cfg.batch_size)
        val = [examples[i] for i in order[:n_val]]
        train = [examples[i] for i in order[n_val:]]
        if not val:
            self.log(f"sft: only {len(examples)} conversations; validating on the training set")
            val = train
        return SFTBatches(train, self.tokenizer.pad_id, self.cfg.seed), SFTBatches(val, self.tokenizer.pad_id, 0)

    def _batch(self, data: Any, step: int, micro: int, rows_per_rank: int) -> tuple[Tensor, Tensor]:
        first = (micro * self.dist.world + self.dist.rank) * rows_per_rank
        rows = range(first, first + rows_per_rank)
        if isinstance(data, SFTBatches):
            x, y = data.rows(step, rows, self.global_batch)
        else:
            x, y = data.rows(step, rows)
        return x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)

    def _load_optimizer(self, ckpt: Path) -> None:
        path = ckpt / OPTIMIZER_FILE
        if not path.is_file():
            raise HavocError(f"{path}: missing; cannot resume the optimizer exactly")
        state = torch.load(path, map_location=self.dist.device, weights_only=True)
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # FSDP only

            set_optimizer_state_dict(self.raw_model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def _state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # FSDP only

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.raw_model, self.optimizer, options=opts)
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def save(self, metrics: dict[str, Any]) -> Path | None:
        model_state, optim_state = self._state_dicts()
        path = None
        if self.dist.main:
            state = {"phase": self.cfg.phase, "step": self.step, "tokens_seen": self.tokens_seen,
                     "data_position": {"step": self.step, "note": "batches are a pure function of (seed, step)"},
                     "rng": _rng_state(), "metrics": metrics, "train_config": to_dict(self.cfg),
                     "world_size": self.dist.world}
            path = save_checkpoint(step_dir(self.out_dir, self.step), model_state, self.model_config,
                                   tokenizer=self.tokenizer, trainer_state=state, optimizer_state=optim_state)
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` fixed batches, over all ranks."""
        batches = (self._batch(self.val_data, 0, i, self.cfg.batch_size) for i in range(self.cfg.eval_batches))
        total = torch.stack([t.float() for t in loss_sums(self.model, batches, self.amp)])
        if self.dist.world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def score_tasks(self) -> dict[str, dict[str, Any]]:
        """Benchmark scores of the weights as they are now. Every rank scores (same requests, same
        result) so none waits on a barrier while rank 0 works; only rank 0 writes them."""
        assert self.tasks is not None
        t0, rng = time.perf_counter(), _rng_state()  # lm-eval seeds torch: training's stream must not see it
        self.raw_model.eval()
        try:
            with torch.no_grad():
                results = self.tasks.score(self.raw_model, self.tokenizer)
        finally:
            self.raw_model.train()
            _set_rng_state(rng)
        shown = " | ".join(f"{name} {value:.3f}" for name, value in headline(results).items())
        self.log(f"step {self.step:>6} | {shown} | {time.perf_counter() - t0:.1f} s")
        return results

    # ------------------------------------------------------------------ the loop
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop = True
        self.log("interrupt: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.model.train()
        bar = None
        if self.progress:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.phase, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        last: dict[str, Any] = {}
        try:
            while self.step < cfg.max_steps and not self._stop_all():
                t0 = time.perf_counter()
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, tokens = torch.zeros((), device=self.dist.device), 0
                for micro in range(cfg.grad_accum):
                    x, y = self._batch(self.train_data, self.step, micro, cfg.batch_size)
                    is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
                    defer_sync = is_ddp and micro < cfg.grad_accum - 1
                    with (self.model.no_sync() if defer_sync else nullcontext()), self.amp:
                        loss = self.model(x, y)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                    tokens += int((y != IGNORE_INDEX).sum()) if cfg.phase == "sft" else y.numel()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                    grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.dist.world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= self.dist.world
                    tokens *= self.dist.world
                self.tokens_seen += tokens
                dt = time.perf_counter() - t0
                loss_value = loss_sum.item() / cfg.grad_accum
                if not math.isfinite(loss_value):
                    raise HavocError(f"step {self.step}: loss is {loss_value}; lower lr (now {lr:.3g}) or check data")
                tok_s = (x.numel() * cfg.grad_accum * self.dist.world) / dt
                mfu = self.model_config.flops_per_token(x.shape[1]) * tok_s / (self.peak * self.dist.world)
                last = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                        "grad_norm": round(float(grad_norm), 4), "tokens_seen": self.tokens_seen,
                        "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                        "time": round(time.time(), 3)}
                if self.dist.main:
                    append_metrics(self.out_dir, last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self.evaluate()
                    last["val_loss"] = round(val, 6)
                    if self.dist.main:
                        append_metrics(self.out_dir, {"step": self.step, "val_loss": round(val, 6)})
                    self.log(f"step {self.step:>6} | train loss {loss_value:.4f} | val loss {val:.4f} | "
                             f"ppl {math.exp(min(val, 50)):.1f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu {mfu:.1%}")
                if self.tasks is not None and (self.step % cfg.eval_tasks_every == 0 or self.step == cfg.max_steps):
                    scores = self.score_tasks()
                    if self.dist.main:
                        append_metrics(self.out_dir, {"step": self.step, "tasks": scores})
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save(last)
            if self._stop_all() and self.step < cfg.max_steps:
                path = self.save(last)
                self.log(f"saved {path} at step {self.step}; continue with --resume")
                last["interrupted"] = True
            self.check_replicas()
        finally:
            if bar is not None:
                bar.close()
            signal.signal(signal.SIGINT, previous)
        if self.dist.main:
            try:
                plot_run(self.out_dir)
            except HavocError as e:
                self.log(f"plot skipped: {e}")
        return last

    def check_replicas(self) -> None:
        """DDP keeps full replicas: verify they are bit-identical (integer sum of the weights' bit
        patterns, all-gathered), so a silent divergence cannot go unnoticed."""
        if self.dist.world == 1 or self.cfg.fsdp:
            return
        with torch.no_grad():
            total = sum(p.detach().contiguous().view(-1).view(torch.int32).to(torch.int64).sum()
                        for p in self.raw_model.parameters() if p.dtype == torch.float32)
        sums = [torch.zeros((), dtype=torch.int64, device=self.dist.device) for _ in range(self.dist.world)]
        dist.all_gather(sums, torch.as_tensor(total, device=self.dist.device))
        if len({int(s) for s in sums}) != 1:
            raise HavocError(f"DDP replicas diverged: weight checksums {[int(s) for s in sums]}")
        self.log(f"weights identical on all {self.dist.world} ranks (checksum {int(sums[0])})")

    def _stop_all(self) -> bool:
        """Rank 0's Ctrl-C stops every rank at the same step."""
        if self.dist.world == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------- entry point

def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    trainer = Trainer(cfg, resume=resume, progress=progress)
    dist_env = trainer.dist
    try:
        return trainer.train()
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # its frames would keep the trainer alive (see below)
        raise
    finally:
        # the wrapped model and optimizer hold the process group: free them while the interpreter is
        # whole, or gloo's threads may be torn down at exit ("terminate called", SIGABRT, LOG.md)
        del trainer
        gc.collect()
        dist_env.close()
