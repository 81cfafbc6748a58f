"""Hugging Face interop: HAVOC <-> Llama layout (transformers ``LlamaForCausalLM``).

The whole mapping lives here: config fields, parameter names, files. HAVOC already uses Llama's
"rotate-half" RoPE, pre-norm RMSNorm and a gated MLP, so weights map one to one by renaming (no
permutation, no transposition). ``transformers`` is the optional ``[hf]`` extra, imported lazily;
exporting files does not need it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from havoc_core.atomic import write_atomic, write_atomic_dir
from havoc_core.attention import AttentionConfig
from havoc_core.checkpoint import CONFIG_FILE, check_weights, find_checkpoint, load_weights, save_checkpoint
from havoc_core.config import HavocConfig
from havoc_core.errors import HavocError
from havoc_core.mlp import MLPConfig
from havoc_core.model import HavocModel
from havoc_core.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, HavocTokenizer, tokenizer_config_dict

if TYPE_CHECKING:  # transformers is the optional [hf] extra, imported when used
    from transformers import LlamaConfig, LlamaForCausalLM

ACTIVATIONS = {"gelu": "gelu", "swiglu": "silu"}  # HAVOC mlp.activation -> HF hidden_act (both exact)
_TOP = [("embed.", "model.embed_tokens."), ("norm.", "model.norm."), ("lm_head.", "lm_head.")]
_LAYER = [("attn_norm.", "input_layernorm."), ("mlp_norm.", "post_attention_layernorm."),
          ("attn.", "self_attn."), ("mlp.w1.", "mlp.gate_proj."), ("mlp.w3.", "mlp.up_proj."),
          ("mlp.w2.", "mlp.down_proj.")]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HavocError("Hugging Face interop needs transformers: pip install 'havoc[hf]'") from None
    return transformers


# --------------------------------------------------------------------------- config

def llama_config_dict(cfg: HavocConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of the exported model, in the long-standing Llama keys (``rope_theta``) that
    every transformers version, vLLM and the llama.cpp converter read. Refuses what Llama cannot
    express. Dropout rates (training only) are not carried except ``attention_dropout``."""
    a = cfg.attention
    if a.rotary_dim != a.head_dim:
        raise HavocError(f"attention.rotary_dim: Llama rotates the whole head (attention.head_dim = {a.head_dim}), "
                         f"found {a.rotary_dim}; partial rotary cannot be exported")
    if cfg.d_model % a.num_heads:
        raise HavocError(f"d_model: transformers' Llama needs a multiple of attention.num_heads ({a.num_heads}), "
                         f"found {cfg.d_model}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": ACTIVATIONS[cfg.mlp.activation],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range,
        "rope_theta": a.rope_theta,
        "rope_scaling": None,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def to_llama_config(cfg: HavocConfig, dtype: torch.dtype = torch.float32) -> LlamaConfig:
    return _transformers().LlamaConfig.from_dict(llama_config_dict(cfg, dtype))


def _first_id(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def from_llama_config(llama: LlamaConfig, where: str = "") -> HavocConfig:
    """HavocConfig of a transformers LlamaConfig (4.x ``rope_theta``/``rope_scaling`` or 5.x
    ``rope_parameters``). Refuses what HAVOC cannot run, naming the HF field. A list of eos ids
    keeps the first; a missing pad id becomes the eos id (see docs/HF.md)."""
    c = llama

    def refuse(key: str, expected: str, found: Any) -> HavocError:
        return HavocError(f"{where}{key}: expected {expected}, found {json.dumps(found, default=str)}")

    if getattr(c, "model_type", "llama") != "llama":
        raise refuse("model_type", '"llama" (HAVOC imports the Llama layout only)', c.model_type)
    act = {hf: ours for ours, hf in ACTIVATIONS.items()}.get(c.hidden_act)
    if act is None:
        raise refuse("hidden_act", " or ".join(f'"{v}"' for v in ACTIVATIONS.values()), c.hidden_act)
    if getattr(c, "mlp_bias", False):
        raise refuse("mlp_bias", "false (HAVOC's MLP has no bias)", c.mlp_bias)
    # transformers 5 keeps theta and scaling in rope_parameters (rope_scaling is an alias of it)
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise refuse("rope_scaling", "null (plain RoPE)", rope)
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    bos, eos = _first_id(c.bos_token_id), _first_id(c.eos_token_id)
    for key, tid in [("bos_token_id", bos), ("eos_token_id", eos)]:
        if not isinstance(tid, int):
            raise refuse(key, "a token id", tid)
    pad = c.pad_token_id if isinstance(c.pad_token_id, int) else eos
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = HavocConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
        max_seq_len=c.max_position_embeddings,
        attention=AttentionConfig(num_heads=c.num_attention_heads, head_dim=head_dim,
                                  num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                                  dropout=float(c.attention_dropout or 0.0), rotary_dim=head_dim,
                                  rope_theta=float(theta), bias=bool(c.attention_bias)),
        mlp=MLPConfig(hidden_dim=c.intermediate_size, activation=act),
        layer_norm_eps=float(c.rms_norm_eps), initializer_range=float(c.initializer_range),
        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )
    return cfg.validate(where)


# --------------------------------------------------------------------------- weights

def _rename(name: str, pairs: list[tuple[str, str]], layer_pairs: list[tuple[str, str]],
            layer_prefix: tuple[str, str]) -> str | None:
    src_layer, dst_layer = layer_prefix
    if m := re.fullmatch(rf"{re.escape(src_layer)}(\d+)\.(.+)", name):
        i, rest = m.groups()
        for src, dst in layer_pairs:
            if rest.startswith(src):
                return f"{dst_layer}{i}.{dst}{rest[len(src):]}"
        return None
    for src, dst in pairs:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def hf_name(name: str) -> str | None:
    """HAVOC parameter name -> Llama name (None for a name with no counterpart)."""
    return _rename(name, _TOP, _LAYER, ("layers.", "model.layers."))


def havoc_name(name: str) -> str | None:
    """Llama parameter name -> HAVOC name (None for a name with no counterpart)."""
    swap = [(b, a) for a, b in _TOP]
    return _rename(name, swap, [(b, a) for a, b in _LAYER], ("model.layers.", "layers."))


def to_llama_state_dict(state_dict: dict[str, torch.Tensor], cfg: HavocConfig) -> dict[str, torch.Tensor]:
    """Rename a HAVOC state dict (checked against ``cfg``) to Llama names. The same tensors, no
    copies; a tied embedding stays stored once (no ``lm_head.weight``), as ``save_pretrained`` does."""
    check_weights({k: tuple(v.shape) for k, v in state_dict.items()}, cfg, "state_dict")
    return {hf_name(k): v for k, v in state_dict.items()}  # type: ignore[misc]


def from_llama_state_dict(state_dict: dict[str, torch.Tensor], cfg: HavocConfig,
                          where: str = "state_dict") -> dict[str, torch.Tensor]:
    """Rename a Llama state dict to HAVOC names and check every name and shape against ``cfg``.
    A tied ``lm_head.weight`` (some files store it twice) must equal the embedding and is dropped;
    RoPE ``inv_freq`` buffers (older files) are recomputed, so they are skipped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            emb = state_dict.get("model.embed_tokens.weight")
            if emb is None or not torch.equal(emb, v):
                raise HavocError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                 "model.embed_tokens.weight")
            continue
        name = havoc_name(k)
        if name is None:
            raise HavocError(f"{where}: {k}: no HAVOC counterpart for this Llama parameter")
        out[name] = v
    check_weights({k: tuple(v.shape) for k, v in out.items()}, cfg, where)
    return out


# --------------------------------------------------------------------------- in-memory models

def to_llama(model: HavocModel) -> LlamaForCausalLM:
    """A transformers ``LlamaForCausalLM`` computing the same function, in eval mode, on the same
    device and dtype. It shares the HAVOC model's weight tensors (no copy): changing one changes both."""
    tf = _transformers()
    w = model.embed.weight
    config = to_llama_config(model.config, w.dtype)
    state = to_llama_state_dict(model.state_dict(), model.config)
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf = tf.LlamaForCausalLM(config)
    hf.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    # RoPE frequencies are a non-persistent buffer: rebuild it for real on the weights' device.
    with torch.device(w.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
    assert not any(t.is_meta for t in hf.buffers()), "a transformers buffer was left on the meta device"
    return hf.eval()


# --------------------------------------------------------------------------- files

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CopiedTokenizer:
    """A tokenizer that is not a HAVOC one (an imported Llama's): its files are kept verbatim."""

    def __init__(self, file: Path) -> None:
        self.files = {name: file.parent / name for name in TOKENIZER_FILES[1:] if (file.parent / name).is_file()}
        self.files[TOKENIZER_FILES[0]] = file

    def save(self, directory: str | Path) -> None:
        for name, src in self.files.items():
            shutil.copyfile(src, Path(directory) / name)


def _load_tokenizer(path: Path, cfg: HavocConfig) -> Any:
    """The HAVOC tokenizer at ``path`` (a dir holding tokenizer.json, or the file; checked against
    ``cfg``), or, for a valid file without HAVOC's special tokens, a ``CopiedTokenizer``."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise HavocError(f"{file}: not found; HAVOC needs the fast tokenizer file (with transformers: "
                         "AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes it)")
    try:
        tok = HavocTokenizer.load(file)
    except HavocError as error:
        try:
            n = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
        except Exception:  # the Rust library raises a bare Exception for malformed files
            raise error from None
        if n > cfg.vocab_size:
            raise HavocError(f"{file}: vocab_size: the tokenizer has {n} tokens, the model only "
                             f"{cfg.vocab_size} embeddings") from None
        return CopiedTokenizer(file)
    tok.check_compatible(cfg)
    return tok


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HavocError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HavocError(f"{path}: cannot read as JSON ({e})") from None


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single ``model.safetensors`` or of the shards listed in its index.
    Pickled ``.bin`` weights are refused: unpickling runs arbitrary code."""
    if (hf_dir / HF_INDEX).is_file():
        weight_map = _read_json(hf_dir / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HavocError(f"{hf_dir / HF_INDEX}: weight_map: expected an object naming each tensor's shard")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
    elif (hf_dir / HF_WEIGHTS).is_file():
        shards = {HF_WEIGHTS: []}
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin"))
        found = f"found only {', '.join(pickles)} (pickle files, never loaded: they can run code); " if pickles else ""
        raise HavocError(f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX}; {found}convert with "
                         "model.save_pretrained(dir, safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        path = hf_dir / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names or list(f.keys()):
                    if name not in f.keys():
                        raise HavocError(f"{path}: {name}: listed in {HF_INDEX} but not in this shard")
                    state[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise HavocError(f"{path}: cannot read as safetensors ({e})") from None
    return state


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a HAVOC checkpoint as a Hugging Face Llama dir that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load as is: config.json, model.safetensors (same dtype), tokenizer files
    (HAVOC's chat template and special tokens), generation_config.json."""
    ckpt = find_checkpoint(checkpoint)
    cfg = HavocConfig.load(ckpt / CONFIG_FILE)
    config = llama_config_dict(cfg)  # refuse before reading the weights
    tok = _load_tokenizer(Path(tokenizer) if tokenizer else ckpt, cfg)
    state = load_weights(ckpt, cfg)
    config["torch_dtype"] = str(state["embed.weight"].dtype).removeprefix("torch.")
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    def write(tmp: Path) -> None:
        write_atomic(tmp / HF_CONFIG, json.dumps(config, indent=2) + "\n")
        write_atomic(tmp / GENERATION_CONFIG, json.dumps(ids, indent=2) + "\n")
        tensors = {k: v.contiguous() for k, v in to_llama_state_dict(state, cfg).items()}
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        tok.save(tmp)
        if isinstance(tok, HavocTokenizer):  # add the context length transformers should know
            text = json.dumps(tokenizer_config_dict(tok, model_max_length=cfg.max_seq_len), indent=2,
                              ensure_ascii=False)
            write_atomic(tmp / TOKENIZER_CONFIG_FILE, text + "\n")

    return write_atomic_dir(Path(out_dir), write)


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a Llama-layout Hugging Face dir (single or sharded safetensors) into a HAVOC checkpoint:
    config.json, model.safetensors (same dtype) and its tokenizer (kept verbatim if not HAVOC's)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HavocError(f"{hf_dir}: not a directory (expected a Hugging Face model dir with {HF_CONFIG})")
    path = hf_dir / HF_CONFIG
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("model_type") != "llama":
        found = data.get("model_type") if isinstance(data, dict) else data
        raise HavocError(f"{path}: model_type: expected \"llama\" (HAVOC imports the Llama layout only), "
                         f"found {json.dumps(found)}")
    try:
        llama = _transformers().LlamaConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise HavocError(f"{path}: not a valid Llama config ({e})") from None
    cfg = from_llama_config(llama, where=f"{path}: ")
    tok = _load_tokenizer(hf_dir, cfg)
    state = from_llama_state_dict(_read_safetensors(hf_dir), cfg, where=str(hf_dir))
    return save_checkpoint(out_dir, state, cfg, tokenizer=tok)
