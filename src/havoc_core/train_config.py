"""``TrainConfig``: every setting of a training run, from a TOML/JSON file and/or one CLI flag per
field (generated from this dataclass), saved into every checkpoint's trainer_state.json."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from havoc_core.config import from_dict, to_dict
from havoc_core.errors import ConfigError


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
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    eval_tasks: str = ""  # benchmark tasks scored during training, as `havoc eval --tasks` takes them
    eval_tasks_every: int = 500  # steps between task scores (and at the last step)
    eval_tasks_limit: int = 0  # questions per task (0 = all)
    save_every: int = 500
    keep_last: int = 3
    seed: int = 1337
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA and native-bf16 CPUs
    compile: bool = False
    fsdp: bool = False
    skip_invalid: bool = False  # sft: skip (and count) invalid conversations instead of failing

    def validate(self, where: str = "train config: ") -> TrainConfig:
        positive = ["max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "eval_tasks_every",
                    "save_every", "keep_last"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}{key}: expected a positive integer, found {getattr(self, key)}")
        for key in ["seq_len", "warmup_steps", "eval_tasks_limit"]:
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
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError(f"{where}optimizer: muon is not supported with fsdp=true (Newton-Schulz needs each "
                              "whole matrix); use adamw")
        if self.eval_tasks and self.fsdp:
            raise ConfigError(f"{where}eval_tasks: not with fsdp=true (the sharded model cannot score alone); "
                              "score the saved checkpoints with `havoc eval CKPT --tasks ...`")
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
