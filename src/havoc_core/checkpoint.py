"""Checkpoint directories: their names, atomic save, strict reading, precise errors.

Layout (see docs/CHECKPOINTS.md)::

    checkpoints/<run>/checkpoint_step_<N>/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        trainer_state.json  optimizer.pt
        quantization.json    (only in a checkpoint written by `havoc quantize`: inference only)

This module knows files and configs only; ``model.load_model`` builds the model from them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from havoc_core.atomic import write_atomic, write_atomic_dir
from havoc_core.config import PRESETS, HavocConfig, get_preset
from havoc_core.errors import CheckpointError, HavocError
from havoc_core.integrity import verify, write_manifest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
QUANTIZATION_FILE = "quantization.json"  # marks a quantized (inference-only) checkpoint: inference.py reads it
RUN_DIRS = {"pretrain": "checkpoints/havoc_phase0_pretrain", "sft": "checkpoints/havoc_phase1_sft"}
CHAT_RUN = RUN_DIRS["sft"]  # where `havoc chat`, `havoc serve` and `havoc smoke` look without a path
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}  # safetensors' names of the dtypes a model can be stored in
STEP_DIR = re.compile(r"^checkpoint_step_(\d+)$")


# --------------------------------------------------------------------------- names and finding

def step_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoint_step_<step>``."""
    return Path(run_dir) / f"checkpoint_step_{step}"


def step_of(path: str | Path) -> int | None:
    """The step of a ``checkpoint_step_N`` directory, None for any other name."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint_step_N`` dirs of a run, oldest first (temporary dirs are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if (step := step_of(p)) is not None and (p / CONFIG_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest checkpoint of a run dir."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (with {CONFIG_FILE}), found a file")
    steps = list_checkpoints(path)
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path}: no {CONFIG_FILE} here and no checkpoint_step_N directories under it")


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The given checkpoint (or run dir), or the newest one under ``CHAT_RUN``."""
    if path is not None:
        return find_checkpoint(path)
    found = list_checkpoints(CHAT_RUN)
    if not found:
        raise CheckpointError(f"{CHAT_RUN}: no checkpoint yet; run `make demo` to train a small chat model, "
                              "or `havoc sft` to fine-tune your own, or pass a CHECKPOINT")
    return found[-1]


def load_config(path: str | Path) -> HavocConfig:
    """The complete model config of a checkpoint (or of a run's newest checkpoint)."""
    return HavocConfig.load(find_checkpoint(path) / CONFIG_FILE)


def config_from_source(source: str) -> HavocConfig:
    """A model config from a preset name, a config.json file, or a checkpoint/run directory."""
    if source in PRESETS:
        return get_preset(source)
    path = Path(source)
    if path.is_file():
        return HavocConfig.load(path)
    if path.is_dir():
        return load_config(path)
    raise HavocError(f"{source}: not a preset ({', '.join(PRESETS)}), a config.json or a checkpoint directory")


# --------------------------------------------------------------------------- saving

def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: HavocConfig, *,
                    tokenizer: Any = None, trainer_state: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint dir atomically. ``tokenizer`` is anything with ``save(dir)``
    (``havoc_core.tokenizer.HavocTokenizer``); the tied embedding is stored once. ``extra_files``:
    name -> text of further files (hashed into checksums.json with the rest)."""

    def write(tmp: Path) -> None:
        config.save(tmp / CONFIG_FILE)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            write_atomic(tmp / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=2) + "\n")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        for name, text in (extra_files or {}).items():
            write_atomic(tmp / name, text)
        write_manifest(tmp, WEIGHTS_FILE)  # last: it hashes every file written above

    return write_atomic_dir(Path(path), write)


def save_model(path: str | Path, model: torch.nn.Module, **kwargs: Any) -> Path:
    """``save_checkpoint`` of a ``HavocModel`` (its state dict and its ``config``)."""
    return save_checkpoint(path, model.state_dict(), model.config, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reading and checking

def _explain(name: str, dim: int, found: int, cfg: HavocConfig) -> str:
    """Name the config field behind dimension ``dim`` of parameter ``name``."""
    a = cfg.attention
    head_dim, _ = a.dims(cfg.d_model)
    heads = {"q_proj": ("attention.num_heads", a.num_heads), "o_proj": ("attention.num_heads", a.num_heads),
             "k_proj": ("attention.num_kv_heads", a.num_kv_heads), "v_proj": ("attention.num_kv_heads", a.num_kv_heads)}
    part = name.split(".")[-2] if "." in name else name
    if part in heads and (dim == 0) == (part != "o_proj"):
        field, n = heads[part]
        hint = (f" (e.g. {field} {found // head_dim} with attention.head_dim {head_dim})"
                if found % head_dim == 0 else "")
        return f"{field} x attention.head_dim: weights imply {found}, config.json says {n * head_dim} " \
               f"({n} x {head_dim}){hint}"
    if part in ("w1", "w3", "w2") and (dim == 0) == (part != "w2"):
        return f"mlp.hidden_dim: weights imply {found}, config.json says {cfg.mlp.hidden_dim}"
    if part in ("embed", "lm_head") and dim == 0:
        return f"vocab_size: weights imply {found}, config.json says {cfg.vocab_size}"
    return f"d_model: weights imply {found}, config.json says {cfg.d_model}"


def check_weights(found: dict[str, tuple[int, ...]], cfg: HavocConfig, where: str) -> None:
    """Compare weight names/shapes with what ``cfg`` builds; raise naming the responsible field.
    The layer count is compared first, so an absurd num_layers is refused before anything is sized."""
    layer_ids = {int(m.group(1)) for k in found if (m := re.match(r"layers\.(\d+)\.", k))}
    if len(layer_ids) != cfg.num_layers:
        raise CheckpointError(f"{where}: num_layers: weights imply {len(layer_ids)}, config.json says {cfg.num_layers}")
    expected = cfg.param_shapes()
    for key, field, says in [("lm_head.weight", "tie_word_embeddings", cfg.tie_word_embeddings),
                             ("layers.0.attn.q_proj.bias", "attention.bias", not cfg.attention.bias)]:
        if (key in found) != (key in expected):
            has = "has" if key in found else "has no"
            raise CheckpointError(f"{where}: {field}: weights file {has} {key}, config.json says "
                                  f"{json.dumps(says if field == 'tie_word_embeddings' else not says)}")
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{where}: missing parameter {missing[0]} (shape {list(expected[missing[0]])})"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected parameter {unexpected[0]} not built by config.json"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    bad = [(k, found[k], expected[k]) for k in expected if found[k] != expected[k]]
    if bad:
        k, f, e = bad[0]
        if len(f) != len(e):
            raise CheckpointError(f"{where}: {k} has {len(f)} dimensions {list(f)}, expected {list(e)}")
        dim = next(i for i in range(len(e)) if f[i] != e[i])
        more = f" ({len(bad)} parameters mismatch)" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: {k} has shape {list(f)}, config.json builds {list(e)}: "
                              f"{_explain(k, dim, f[dim], cfg)}{more}")


def load_weights(ckpt: Path, cfg: HavocConfig, device: str | torch.device = "cpu", *,
                 shapes_only: bool = False, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """Read model.safetensors after checking every name and shape against ``cfg`` and then (unless
    ``check_hashes`` is false) every file but optimizer.pt against checksums.json: a checkpoint whose
    bytes changed since save is refused, never loaded with other logits (``shapes_only``: check
    from the file header alone and return nothing)."""
    path = ckpt / WEIGHTS_FILE
    if (ckpt / QUANTIZATION_FILE).is_file():
        raise CheckpointError(f"{ckpt / QUANTIZATION_FILE}: a quantized checkpoint (`havoc quantize`) runs with "
                              "chat, generate, smoke and serve only; train, evaluate or export its source")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (a checkpoint needs its weights)")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            check_weights(shapes, cfg, str(path))
            dtypes = {k: f.get_slice(k).get_dtype() for k in shapes}
            odd = [k for k in dtypes if dtypes[k] not in FLOAT_DTYPES or dtypes[k] != dtypes["embed.weight"]]
            if odd:  # one float dtype for every tensor: anything else fails later, inside a matmul
                raise CheckpointError(f"{path}: {odd[0]} is {dtypes[odd[0]]}, expected the dtype of embed.weight "
                                      f"({dtypes['embed.weight']}), one of {', '.join(sorted(FLOAT_DTYPES))}")
            if shapes_only:
                return {}
            if check_hashes:
                verify(ckpt, skip=(OPTIMIZER_FILE,))
            return {k: f.get_tensor(k) for k in shapes}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
