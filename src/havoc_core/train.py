"""One training loop for pretraining and SFT, from a laptop CPU to torchrun on many GPUs.

Data order is a pure function of ``(seed, step, global row index)``: each row of a global batch is
drawn from its own RNG stream. Resuming therefore needs only the step (plus model, optimizer and
RNG states for dropout), and a global batch is the same rows whether it is split over 1 or N ranks.

Distributed runs go through ``torchrun`` only: DDP (gloo on CPU, NCCL on GPU) or FSDP2
(``fully_shard``) with ``fsdp = true``. Rank 0 logs and writes.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import tomllib
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from havoc_core.checkpoint import (
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    find_checkpoint,
    list_checkpoints,
    load_model,
    save_checkpoint,
)
from havoc_core.config import HavocConfig, from_dict, get_preset, to_dict
from havoc_core.errors import ConfigError, HavocError
from havoc_core.generate import cpu_has_native_bf16
from havoc_core.model import IGNORE_INDEX, HavocModel

RUN_DIRS = {"pretrain": "checkpoints/havoc_phase0_pretrain", "sft": "checkpoints/havoc_phase1_sft"}
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything a run needs; saved into every checkpoint's trainer_state.json."""

    phase: Literal["pretrain", "sft"] = "pretrain"
    init: str = "havoc-tiny"  # preset name, config.json, or checkpoint/run dir to start from
    data: str = ""  # pretrain: a `havoc prepare` dir; sft: conversations JSONL ("" = built-in)
    tokenizer: str = ""  # "" = the init checkpoint's or the data dir's tokenizer
    out_dir: str = ""  # "" = checkpoints/havoc_phase0_pretrain or checkpoints/havoc_phase1_sft
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 0  # 0 = the model's max_seq_len (pretraining window length)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 500
    keep_last: int = 3
    seed: int = 1337
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA and native-bf16 CPUs
    compile: bool = False
    fsdp: bool = False
    skip_invalid: bool = False  # sft: skip (and count) invalid conversations instead of failing

    def validate(self, where: str = "train config: ") -> TrainConfig:
        positive = ["max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                    "keep_last"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}{key}: expected a positive integer, found {getattr(self, key)}")
        for key in ["seq_len", "warmup_steps"]:
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}{key}: expected an integer >= 0, found {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"{where}lr: expected a positive number, found {self.lr}")
        for key in ["min_lr_ratio", "beta1", "beta2"]:
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{where}{key}: expected a number in [0, 1], found {getattr(self, key)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            key = "weight_decay" if self.weight_decay < 0 else "grad_clip"
            raise ConfigError(f"{where}{key}: expected a number >= 0, found {getattr(self, key)}")
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a TOML or JSON file (strict keys and types), then apply ``overrides``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot parse ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"{path}: {unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})")
        return cls.from_settings({**data, **(overrides or {})}, where=f"{path}: ")

    @classmethod
    def from_settings(cls, settings: dict[str, Any], where: str) -> TrainConfig:
        """The defaults with ``settings`` on top, type-checked and validated."""
        return from_dict(cls, {**to_dict(cls()), **settings}, where=where).validate(where)


# --------------------------------------------------------------------------- schedule, flops

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


_PEAK_CACHE: dict[str, float] = {}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def training_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The matmul dtype of training: ``auto`` is bf16 autocast on CUDA and on CPUs with native bf16
    (AVX512-BF16/AMX: 1.6x the fp32 training tokens/s on havoc-tiny and havoc-small here), else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Dense peak FLOP/s used for MFU: a table for known GPUs (bf16), else this CPU's matmul FLOP/s in
    ``dtype`` measured once on a 1024^3 product (this machine: ~180 GFLOP/s fp32, ~420 bf16, 2 cores)."""
    key = f"{device}/{dtype}"
    if key not in _PEAK_CACHE:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            _PEAK_CACHE[key] = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 312e12)
        else:  # best of 5 short trials: a busy moment (e.g. tokenizer threads winding down) can't deflate it
            a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
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


# --------------------------------------------------------------------------- data

class PretrainBatches:
    """Random windows of ``seq_len + 1`` tokens from uint32 shards; row ``g`` of step ``s`` comes
    from RNG stream ``(seed, s, g)``, so the data position is just the step."""

    def __init__(self, data_dir: str, split: str, seq_len: int, seed: int) -> None:
        from havoc_core.data import open_split

        self.shards = [s for s in open_split(data_dir, split) if len(s) > seq_len + 1]
        if not self.shards:
            raise HavocError(f"{data_dir}: the {split} split has no shard longer than seq_len+1={seq_len + 1} tokens")
        lengths = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.weights = lengths / lengths.sum()
        self.seq_len, self.seed = seq_len, seed

    def rows(self, step: int, rows: range) -> tuple[Tensor, Tensor]:
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for i, g in enumerate(rows):
            rng = np.random.default_rng([self.seed, step, g])
            shard = self.shards[rng.choice(len(self.shards), p=self.weights) if len(self.shards) > 1 else 0]
            start = int(rng.integers(0, len(shard) - self.seq_len - 1))
            out[i] = shard[start : start + self.seq_len + 1]
        t = torch.from_numpy(out)
        return t[:, :-1], t[:, 1:]


class SFTBatches:
    """Whole conversations, reshuffled every epoch; targets are -100 outside assistant tokens."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int, seed: int) -> None:
        if not examples:
            raise HavocError("sft: no conversations to train on")
        self.examples, self.pad_id, self.seed = examples, pad_id, seed

    def _example(self, index: int) -> tuple[list[int], list[int]]:
        epoch, i = divmod(index, len(self.examples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self.examples[order[i]]

    def rows(self, step: int, rows: range, global_batch: int) -> tuple[Tensor, Tensor]:
        picked = [self._example(step * global_batch + g) for g in rows]
        width = max(len(ids) for ids, _ in picked) - 1
        x = torch.full((len(picked), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(picked), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, mask) in enumerate(picked):
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            n = len(ids) - 1
            x[i, :n] = ids_t[:-1]
            y[i, :n] = torch.where(mask_t[1:], ids_t[1:], IGNORE_INDEX)
        return x, y


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never decay norms, biases or the embedding (nanoGPT's split, plus embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        from havoc_core.tokenizer import HavocTokenizer

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
            from havoc_core.data import MANIFEST, read_manifest, tokenizer_hash

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
        if self.compute_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            self.log("warning: dtype bfloat16 on a CPU without native bf16: matmuls many times slower than fp32")
        self.amp = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if self.compute_dtype == torch.bfloat16 else nullcontext())
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        if cfg.compile:
            model = torch.compile(model)
        if self.dist.world > 1 and not cfg.fsdp:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
        if start is not None and resume_state is not None:
            self._load_optimizer(start)
            _set_rng_state(resume_state["rng"])
            self.log(f"resumed {start} at step {self.step}")
        self.peak = peak_flops(device, self.compute_dtype)
        self._stop = False

    # ------------------------------------------------------------------ setup helpers
    def log(self, msg: str) -> None:
        if self.dist.main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _init_config(self, init: str) -> HavocConfig:
        """The model config to start from: a checkpoint's, a config.json's, or a preset's (whose
        vocab_size follows the tokenizer, said out loud)."""
        if Path(init).is_dir():
            from havoc_core.checkpoint import load_config

            return load_config(init)
        if Path(init).is_file():
            return HavocConfig.load(init)
        cfg = get_preset(init)
        if self.tokenizer.vocab_size != cfg.vocab_size:
            self.log(f"{init}: vocab_size set to {self.tokenizer.vocab_size} to match the tokenizer")
            cfg = dataclasses.replace(cfg, vocab_size=self.tokenizer.vocab_size)
        return cfg

    def _sft_data(self, max_len: int) -> tuple[SFTBatches, SFTBatches]:
        from havoc_core.data import load_conversations

        if self.cfg.data:
            if not Path(self.cfg.data).is_file():
                raise HavocError(f"{self.cfg.data}: no such conversations file")
            examples = load_conversations(self.cfg.data, self.tokenizer, max_len, skip_invalid=self.cfg.skip_invalid)
        else:
            from havoc_core.corpus import builtin_conversations

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
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.raw_model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def _state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

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
            path = save_checkpoint(self.out_dir / f"checkpoint_step_{self.step}", model_state, self.model_config,
                                   tokenizer=self.tokenizer, trainer_state=state, optimizer_state=optim_state)
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, device=self.dist.device)
        for i in range(self.cfg.eval_batches):
            x, y = self._batch(self.val_data, 0, i, self.cfg.batch_size)
            with self.amp:
                loss = self.model(x, y)
            n = (y != IGNORE_INDEX).sum()
            total += torch.stack([loss.float() * n, n.float()])
        if self.dist.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1].clamp(min=1)).item()

    # ------------------------------------------------------------------ the loop
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop = True
        self.log("interrupt: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics_path = self.out_dir / METRICS_FILE
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

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
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self.evaluate()
                    last["val_loss"] = round(val, 6)
                    if self.dist.main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps({"step": self.step, "val_loss": round(val, 6)}) + "\n")
                    self.log(f"step {self.step:>6} | train loss {loss_value:.4f} | val loss {val:.4f} | "
                             f"ppl {math.exp(min(val, 50)):.1f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu {mfu:.1%}")
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


# --------------------------------------------------------------------------- metrics and plots

def read_metrics(run_dir: str | Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """Last training record and val loss per step (a resumed run re-writes later steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise HavocError(f"{path}: no metrics yet (train first)")
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec and "loss" not in rec:
            val[rec["step"]] = rec["val_loss"]
        else:
            train[rec["step"]] = rec
    return train, val


def plot_run(run_dir: str | Path) -> Path:
    """Write ``loss.png`` (train and validation loss against step) beside the run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HavocError("plotting needs matplotlib: pip install 'havoc[train]'") from None
    train, val = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
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
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


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


def evaluate_checkpoint(checkpoint: str, data: str, batch_size: int = 8, max_batches: int = 50,
                        seq_len: int = 0) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte of a checkpoint on a prepared dir's val split
    (sequential windows) or a conversations JSONL (assistant tokens)."""
    from havoc_core.tokenizer import HavocTokenizer

    model = load_model(checkpoint)
    tok = HavocTokenizer.load(find_checkpoint(checkpoint))
    seq_len = seq_len or model.config.max_seq_len
    batches: Iterator[tuple[Tensor, Tensor]]
    if Path(data).is_dir():
        from havoc_core.data import open_split

        stream = np.concatenate([np.asarray(s) for s in open_split(data, "val")]).astype(np.int64)
        n_win = min(max_batches * batch_size, (len(stream) - 1) // seq_len)
        if n_win == 0:
            raise HavocError(f"{data}: val split shorter than one window of {seq_len + 1} tokens")
        windows = torch.from_numpy(stream[: n_win * seq_len + 1])
        xs = windows[:-1].view(n_win, seq_len)
        ys = windows[1:].view(n_win, seq_len)
        batches = ((xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n_win, batch_size))
    elif Path(data).is_file():
        from havoc_core.data import load_conversations

        examples = load_conversations(data, tok, model.config.max_seq_len)
        sft = SFTBatches(examples, tok.pad_id, 0)
        n = min(len(examples), max_batches * batch_size)
        batches = (sft.rows(0, range(i, min(i + batch_size, n)), 0) for i in range(0, n, batch_size))
    else:
        raise HavocError(f"{data}: no such data dir or conversations file")
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            loss = model(x, y)
            n = int((y != IGNORE_INDEX).sum())
            total_nats += loss.item() * n
            total_tokens += n
            total_bytes += sum(len(tok.decode(row[row != IGNORE_INDEX].tolist()).encode("utf-8")) for row in y)
    loss = total_nats / max(1, total_tokens)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": total_tokens,
            "bits_per_byte": total_nats / math.log(2) / max(1, total_bytes)}
