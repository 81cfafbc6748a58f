"""Model configuration: nested dataclasses, presets, and strict, versioned (de)serialisation.

Every field is read back from the dataclass definitions themselves (``from_dict``); nothing
lists fields by hand: a hand-kept list that omits the nested configs builds the wrong model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from havoc_core.atomic import write_atomic
from havoc_core.attention import AttentionConfig
from havoc_core.errors import ConfigError
from havoc_core.mlp import MLPConfig

T = TypeVar("T")

FORMAT_VERSION = 2


# --------------------------------------------------------------------------- generic (de)serialisation

def to_dict(obj: Any) -> Any:
    """Recursively turn a dataclass into plain JSON-ready dicts, in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, path, where)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(item, v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where=where, prefix=f"{path}.")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # no setting means anything at NaN or infinity (JSON's literals and TOML's nan/inf parse)
            if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
                raise ConfigError(f"{where}{path}: expected a finite number, found {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}{path}: expected {_type_name(tp)}, found {json.dumps(value)}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses by their type hints.

    Strict: an unknown key, a missing key or a wrongly typed value raises ``ConfigError`` naming
    the key path (``attention.num_kv_heads``); ``where`` prefixes the message (e.g. a file name).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'top level'}: expected an object, found {json.dumps(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}{prefix}{unknown[0]}: unknown key (known keys: {', '.join(names)})")
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{where}{prefix}{missing[0]}: missing key (expected {_type_name(hints[missing[0]])})")
    return cls(**{n: _convert(hints[n], data[n], prefix + n, where) for n in names})


# --------------------------------------------------------------------------- the model config

@dataclass
class HavocConfig:
    vocab_size: int = 70000
    d_model: int = 3072
    num_layers: int = 22
    max_seq_len: int = 2048
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Added in format_version 2: false for models with their own output matrix (e.g. imported Llamas).
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        """Resolve derived sizes once, so config.json always holds them explicitly."""
        self.attention = self.attention.resolved(self.d_model)

    # ------------------------------------------------------------------ checks and sizes
    def validate(self, where: str = "") -> HavocConfig:
        """Raise ConfigError for values no model can have; returns self for chaining."""
        a, m = self.attention, self.mlp

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}{key}: {msg}")

        for key, value in [("vocab_size", self.vocab_size), ("d_model", self.d_model),
                           ("num_layers", self.num_layers), ("max_seq_len", self.max_seq_len),
                           ("attention.num_heads", a.num_heads), ("attention.num_kv_heads", a.num_kv_heads),
                           ("attention.head_dim", a.head_dim), ("mlp.hidden_dim", m.hidden_dim)]:
            if value is None or value <= 0:
                raise bad(key, f"expected a positive integer, found {value}")
        if a.num_heads % a.num_kv_heads:
            raise bad("attention.num_heads", f"expected a multiple of attention.num_kv_heads "
                      f"({a.num_kv_heads}), found {a.num_heads}")
        head_dim, rotary_dim = a.dims(self.d_model)
        if rotary_dim <= 0 or a.rotary_dim % 2:
            raise bad("attention.rotary_dim", f"expected a positive even integer, found {rotary_dim}")
        if rotary_dim > head_dim:
            raise bad("attention.rotary_dim", f"expected at most attention.head_dim ({head_dim}), "
                      f"found {rotary_dim}")
        for key, x in [("attention.rope_theta", a.rope_theta), ("layer_norm_eps", self.layer_norm_eps),
                       ("initializer_range", self.initializer_range)]:
            if not math.isfinite(x):  # JSON's NaN/Infinity literals parse, and pass every comparison below
                raise bad(key, f"expected a finite number, found {x}")
        if a.rope_theta <= 0:
            raise bad("attention.rope_theta", f"expected a positive number, found {a.rope_theta}")
        for key, p in [("dropout", self.dropout), ("attention.dropout", a.dropout), ("mlp.dropout", m.dropout)]:
            if not 0.0 <= p < 1.0:
                raise bad(key, f"expected a probability in [0, 1), found {p}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            key = "layer_norm_eps" if self.layer_norm_eps <= 0 else "initializer_range"
            raise bad(key, f"expected a positive number, found {getattr(self, key)}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            tid = getattr(self, key)
            if not 0 <= tid < self.vocab_size:
                raise bad(key, f"expected an id in [0, vocab_size={self.vocab_size}), found {tid}")
        return self

    def num_parameters(self) -> int:
        """Exact parameter count from the config alone (equals ``HavocModel``'s real count)."""
        a, d = self.attention, self.d_model
        head_dim, _ = a.dims(d)
        q, kv = a.num_heads * head_dim, a.num_kv_heads * head_dim
        attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv + d) if a.bias else 0)
        mlp = 3 * d * self.mlp.hidden_dim
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor in the model's state dict, in its order, from the config
        alone: what a weights file must hold, known before anything is built or allocated."""
        a, d, h = self.attention, self.d_model, self.mlp.hidden_dim
        head_dim, _ = a.dims(d)
        q, kv = a.num_heads * head_dim, a.num_kv_heads * head_dim
        layer: list[tuple[str, tuple[int, ...]]] = [("attn_norm.weight", (d,))]
        for name, rows, cols in [("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)]:
            layer.append((f"attn.{name}.weight", (rows, cols)))
            if a.bias:
                layer.append((f"attn.{name}.bias", (rows,)))
        layer += [("mlp_norm.weight", (d,)), ("mlp.w1.weight", (h, d)), ("mlp.w3.weight", (h, d)),
                  ("mlp.w2.weight", (d, h))]
        shapes = {"embed.weight": (self.vocab_size, d)}
        for i in range(self.num_layers):
            shapes.update((f"layers.{i}.{name}", shape) for name, shape in layer)
        shapes["norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style: 6 x the matmul
        parameters (the input embedding is a lookup, not a matmul) plus attention's 12 * L * H * hd * T."""
        t = seq_len or self.max_seq_len
        a = self.attention
        matmul_params = self.num_parameters() - self.vocab_size * self.d_model * (0 if self.tie_word_embeddings else 1)
        return 6 * matmul_params + 12 * self.num_layers * a.num_heads * a.dims(self.d_model)[0] * t

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> HavocConfig:
        """Strictly parse a config dict of any known format_version (migrating old ones)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}top level: expected an object, found {json.dumps(data)[:60]}")
        data = dict(data)
        version = data.pop("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ConfigError(f"{where}format_version: expected an integer from 1 to {FORMAT_VERSION}, "
                              f"found {json.dumps(version)}")
        for v in range(version, FORMAT_VERSION):
            data = _MIGRATIONS[v](data)
        return from_dict(cls, data, where=where).validate(where)

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HavocConfig:
        """Read a config.json; every failure is a ConfigError naming the file."""
        path = Path(path)
        where = f"{path}: "
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (a checkpoint needs its config.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, where=where)


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 configs (no format_version key) predate tie_word_embeddings; their models tie the
    embeddings (that is what makes havoc-2b 2,047,080,960 parameters), so the field is filled with true."""
    if "tie_word_embeddings" in data:
        raise ConfigError("tie_word_embeddings: unknown key in a format_version 1 config")
    return {**data, "tie_word_embeddings": True}


_MIGRATIONS = {1: _v1_to_v2}


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, HavocConfig] = {
    # 2,047,080,960 parameters: GeGLU, GQA 32/4 with head_dim 80, tied embeddings, 70,000-token vocab.
    "havoc-2b": HavocConfig(
        vocab_size=70000, d_model=2560, num_layers=20, max_seq_len=1024,
        attention=AttentionConfig(num_heads=32, head_dim=80, num_kv_heads=4, rope_theta=10000.0),
        mlp=MLPConfig(hidden_dim=10240, activation="gelu"),
    ),
    # The code defaults.
    "havoc-3b": HavocConfig(),
    # CPU sizes: a few million parameters for tests and the demo, and ~100M for a real laptop run.
    "havoc-tiny": HavocConfig(
        vocab_size=8192, d_model=256, num_layers=4, max_seq_len=512,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2), mlp=MLPConfig(hidden_dim=768),
    ),
    "havoc-small": HavocConfig(
        vocab_size=32768, d_model=768, num_layers=12, max_seq_len=1024,
        attention=AttentionConfig(num_heads=12, num_kv_heads=4), mlp=MLPConfig(hidden_dim=2048),
    ),
}


def get_preset(name: str) -> HavocConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown name {name!r} (expected one of {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def format_params(n: int) -> str:
    """``2047080960 -> '2.05B'``, as the chat banner prints it."""
    return f"{n / 1e9:.2f}B"
