"""Hugging Face interop against real transformers: tiny random models built here, no downloads.

Parity is checked both ways (HAVOC -> export -> transformers, transformers save_pretrained ->
import -> HAVOC): fp32 logits, greedy generations, chat-template ids; plus a bit-identical
export -> import round trip and every refusal.
"""

import json
import pydoc_data.topics
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from havoc_core import cli
from havoc_core.attention import AttentionConfig
from havoc_core.checkpoint import save_model
from havoc_core.config import HavocConfig
from havoc_core.errors import HavocError
from havoc_core.hf import (
    export,
    from_llama_config,
    import_hf,
    to_llama,
    to_llama_config,
)
from havoc_core.mlp import MLPConfig
from havoc_core.model import HavocModel, load_model
from havoc_core.tokenizer import HavocTokenizer, render_chat

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXT = list(pydoc_data.topics.topics.values())
MESSAGES = [
    {"role": "system", "content": "Answer from the Python documentation."},
    {"role": "user", "content": "What does the with statement do?"},
    {"role": "assistant", "content": "It wraps a block with methods defined by a context manager."},
    {"role": "user", "content": "And a for loop?"},
]

# (activation, num_heads, num_kv_heads, head_dim, tied embeddings, attention bias, rope_theta);
# d_model is 64, so head_dim 24 and 16 differ from d_model // num_heads.
SPECS = {
    "geglu-gqa2-hd24-tied": ("gelu", 4, 2, 24, True, False, 10000.0),
    "swiglu-mqa-hd16-untied-bias": ("swiglu", 8, 1, 16, False, True, 500.0),
    "swiglu-mha-default-hd": ("swiglu", 4, 4, 16, True, False, 10000.0),
}


@pytest.fixture(scope="module")
def tok():
    return HavocTokenizer.train(TEXT, vocab_size=512, show_progress=False)


def havoc_config(spec, vocab_size):
    act, heads, kv, hd, tie, bias, theta = spec
    return HavocConfig(vocab_size=vocab_size, d_model=64, num_layers=2, max_seq_len=128,
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=hd,
                                                 rope_theta=theta, bias=bias),
                       mlp=MLPConfig(hidden_dim=96, activation=act), tie_word_embeddings=tie)


def randomize(model):
    """Weights far from init (norm gains too), so a swapped or mis-rotated tensor shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model.eval()


def sample_ids(tok):
    ids = tok.encode(TEXT[3])[:48]
    assert len(ids) == 48
    return torch.tensor([ids, tok.encode(TEXT[7])[:48]])


def havoc_greedy(model, prompt, steps=32):
    x = prompt
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
    return x


def hf_greedy(hf, prompt, steps=32):
    hf.generation_config.eos_token_id = None  # 32 tokens, never stopping early, like havoc_greedy
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                       do_sample=False, pad_token_id=0)


def chat_ids(hf_tok, messages, prompt):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_parity(model, hf, tok, hf_tok):
    idx = sample_ids(tok)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.abs().max() > 1.0  # a real signal, not near-zero logits that would agree anyway
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = idx[:1, :8]
    assert torch.equal(havoc_greedy(model, prompt), hf_greedy(hf, prompt))
    for prompt in (False, True):
        assert chat_ids(hf_tok, MESSAGES, prompt) == render_chat(tok, MESSAGES, add_generation_prompt=prompt)[0]


# --------------------------------------------------------------------------- HAVOC -> transformers

def test_to_llama_in_memory_shares_weights(tok):
    model = randomize(HavocModel(havoc_config(SPECS["geglu-gqa2-hd24-tied"], tok.vocab_size)))
    hf = to_llama(model)
    assert not hf.training and hf.dtype == torch.float32
    assert hf.model.embed_tokens.weight.data_ptr() == model.embed.weight.data_ptr()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    idx = sample_ids(tok)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", SPECS)
def test_export_loads_in_transformers_with_parity(tok, tmp_path, name):
    cfg = havoc_config(SPECS[name], tok.vocab_size)
    model = randomize(HavocModel(cfg))
    save_model(tmp_path / "ckpt", model, tokenizer=tok)
    out = export(tmp_path / "ckpt", tmp_path / "hf")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.dtype == torch.float32 and hf.config.head_dim == cfg.attention.head_dim
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == cfg.tie_word_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    assert hf_tok.model_max_length == cfg.max_seq_len
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert_parity(model, hf, tok, hf_tok)


# --------------------------------------------------------------------------- transformers -> HAVOC

def save_llama(spec, tok, directory, shard=False):
    """A random LlamaForCausalLM written by transformers itself, with HAVOC's tokenizer beside it."""
    act, heads, kv, hd, tie, bias, theta = spec
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        hidden_act={"gelu": "gelu", "swiglu": "silu"}[act], max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=theta, attention_bias=bias, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = randomize(transformers.LlamaForCausalLM(config))
    hf.save_pretrained(directory, max_shard_size="100KB" if shard else "5GB")
    tok.save(directory)
    return hf


@pytest.mark.parametrize("name", SPECS)
def test_import_from_transformers_with_parity(tok, tmp_path, name):
    shard = name == "swiglu-mqa-hd16-untied-bias"
    hf = save_llama(SPECS[name], tok, tmp_path / "hf", shard=shard)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == shard
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = load_model(ckpt)
    assert model.config.tie_word_embeddings == SPECS[name][4]
    assert model.config.attention.bias == SPECS[name][5]
    havoc_tok = HavocTokenizer.load(ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert_parity(model, hf, havoc_tok, hf_tok)


def test_from_llama_config_reads_transformers_config(tok):
    cfg = havoc_config(SPECS["swiglu-mqa-hd16-untied-bias"], tok.vocab_size)
    assert from_llama_config(to_llama_config(cfg)) == cfg


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_bit_identical(tok, tmp_path, dtype):
    cfg = havoc_config(SPECS["swiglu-mqa-hd16-untied-bias"], tok.vocab_size)
    model = randomize(HavocModel(cfg)).to(dtype)
    save_model(tmp_path / "a", model, tokenizer=tok)
    export(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    before, after = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype == dtype
        assert torch.equal(before[k], after[k]), k
    assert HavocConfig.load(tmp_path / "b" / "config.json") == cfg
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def foreign_tokenizer(directory):
    """A Llama-style tokenizer (``<s>``/``</s>``, no HAVOC role tokens), saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                    show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)


def test_import_keeps_a_foreign_tokenizer_and_exports_it_again(tmp_path):
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=[2, 3], pad_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    foreign_tokenizer(hf_dir)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    cfg = HavocConfig.load(ckpt / "config.json")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.vocab_size) == (1, 2, 2, 416)
    assert (ckpt / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    with pytest.raises(HavocError, match=r"special token <\|pad\|> must have id 0"):
        HavocTokenizer.load(ckpt)  # what chat/SFT report for a tokenizer without HAVOC's role tokens
    out = export(ckpt, tmp_path / "again")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<s>", "</s>")
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 416


# --------------------------------------------------------------------------- refusals

def test_export_refuses_what_llama_cannot_express(tok, tmp_path):
    cfg = havoc_config(SPECS["geglu-gqa2-hd24-tied"], tok.vocab_size)
    cfg.attention.rotary_dim = 12
    save_model(tmp_path / "partial", HavocModel(cfg), tokenizer=tok)
    with pytest.raises(HavocError, match=r"attention\.rotary_dim: .*found 12; partial rotary"):
        export(tmp_path / "partial", tmp_path / "out")
    cfg = HavocConfig(vocab_size=tok.vocab_size, d_model=60, num_layers=1, max_seq_len=32,
                      attention=AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=8), mlp=MLPConfig(hidden_dim=64))
    save_model(tmp_path / "odd", HavocModel(cfg), tokenizer=tok)
    with pytest.raises(HavocError, match=r"d_model: .*multiple of attention\.num_heads \(8\), found 60"):
        export(tmp_path / "odd", tmp_path / "out")
    save_model(tmp_path / "notok", HavocModel(havoc_config(SPECS["swiglu-mha-default-hd"], tok.vocab_size)))
    with pytest.raises(HavocError, match=r"notok/tokenizer\.json: not found"):
        export(tmp_path / "notok", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("model_type", "gpt2", r'model_type: expected "llama".*found "gpt2"'),
    ("hidden_act", "gelu_pytorch_tanh", r'hidden_act: expected "gelu" or "silu", found "gelu_pytorch_tanh"'),
    ("mlp_bias", True, r"mlp_bias: expected false .*found true"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, r"rope_scaling: expected null .*linear"),
])
def test_import_refuses_unsupported_configs(tok, tmp_path, field, value, message):
    save_llama(SPECS["swiglu-mha-default-hd"], tok, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    data = json.loads(path.read_text())
    if field == "rope_scaling":
        data.pop("rope_parameters", None)  # transformers 5 writes rope_parameters; 4.x files have rope_scaling
    path.write_text(json.dumps({**data, field: value}))
    with pytest.raises(HavocError, match=rf"{path}: {message}"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_never_unpickles_and_needs_a_tokenizer(tok, tmp_path):
    hf_dir = tmp_path / "hf"
    save_llama(SPECS["swiglu-mha-default-hd"], tok, hf_dir)
    (hf_dir / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(HavocError, match=r"tokenizer\.json: not found; HAVOC needs the fast tokenizer"):
        import_hf(hf_dir, tmp_path / "ckpt")
    shutil.copy(tmp_path / "tokenizer.json", hf_dir)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail loudly")
    with pytest.raises(HavocError, match=r"found only pytorch_model\.bin \(pickle files, never loaded"):
        import_hf(hf_dir, tmp_path / "ckpt")


def test_missing_transformers_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when absent
    with pytest.raises(HavocError, match=r"pip install 'havoc\[hf\]'"):
        to_llama_config(havoc_config(SPECS["swiglu-mha-default-hd"], tok.vocab_size))


# --------------------------------------------------------------------------- CLI

def test_cli_export_and_import(tok, tmp_path, capsys):
    save_model(tmp_path / "ckpt", HavocModel(havoc_config(SPECS["geglu-gqa2-hd24-tied"], tok.vocab_size)),
               tokenizer=tok)
    assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hf'}" in out and f"wrote {tmp_path / 'back'}" in out
    assert cli.main(["import", str(tmp_path / "ckpt"), str(tmp_path / "x")]) == 2
    assert "error: " in capsys.readouterr().err
