"""Config: strict nested (de)serialisation, versioning, presets and parameter counts."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from havoc_core import AttentionConfig, ConfigError, HavocConfig, HavocModel, MLPConfig, get_preset
from havoc_core.config import PRESETS, format_params

# The seed's config.json for the user's havoc-2b checkpoint: exactly the notes' keys, no version.
NOTES_V1 = {
    "vocab_size": 70000, "d_model": 2560, "num_layers": 20, "max_seq_len": 1024,
    "attention": {"num_heads": 32, "head_dim": 80, "num_kv_heads": 4, "dropout": 0.0,
                  "rotary_dim": 80, "rope_theta": 10000.0, "bias": False},
    "mlp": {"hidden_dim": 10240, "activation": "gelu", "dropout": 0.0},
    "dropout": 0.0, "layer_norm_eps": 1e-5, "initializer_range": 0.02,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def test_notes_v1_config_loads_and_counts_2_05b_on_meta(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(NOTES_V1))
    cfg = HavocConfig.load(path)
    assert cfg.attention == AttentionConfig(32, 80, 4, 0.0, 80, 10000.0, False)
    assert cfg.mlp == MLPConfig(10240, "gelu", 0.0)
    assert cfg.tie_word_embeddings is True  # filled by the v1 migration, explicitly
    with torch.device("meta"):
        model = HavocModel(cfg)
    assert model.num_parameters() == cfg.num_parameters() == 2_047_080_960
    assert format_params(cfg.num_parameters()) == "2.05B"
    assert cfg == get_preset("havoc-2b")


def test_code_defaults_match_the_notes():
    cfg = HavocConfig()
    assert (cfg.d_model, cfg.num_layers, cfg.attention.num_heads, cfg.attention.num_kv_heads) == (3072, 22, 24, 4)
    assert (cfg.mlp.hidden_dim, cfg.mlp.activation) == (12288, "swiglu")
    # head_dim defaults to d_model // num_heads: the notes' 2544-row q_proj for d_model 2560.
    assert HavocConfig(d_model=2560).attention.head_dim == 106
    assert cfg == get_preset("havoc-3b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_count_equals_model_count(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = HavocModel(cfg)
    assert model.num_parameters() == cfg.num_parameters()


@pytest.mark.parametrize("change", [
    dict(tie_word_embeddings=False),
    dict(attention=AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=24, rotary_dim=8, bias=True)),
])
def test_count_with_untied_and_bias(change):
    cfg = HavocConfig(**{**dict(vocab_size=100, d_model=64, num_layers=2, max_seq_len=32,
                                attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                                mlp=MLPConfig(hidden_dim=96)), **change})
    assert HavocModel(cfg).num_parameters() == cfg.num_parameters()


def test_presets_are_independent_copies():
    a = get_preset("havoc-tiny")
    a.attention.num_heads = 99
    assert get_preset("havoc-tiny").attention.num_heads == 4


configs = st.builds(
    lambda heads, group, hd, rot, d, layers, vocab, act, hidden, bias, tie, theta, eps: HavocConfig(
        vocab_size=vocab, d_model=d, num_layers=layers, max_seq_len=64,
        attention=AttentionConfig(num_heads=heads * group, num_kv_heads=heads, head_dim=hd,
                                  rotary_dim=min(rot * 2, hd - hd % 2) or 2, rope_theta=theta, bias=bias),
        mlp=MLPConfig(hidden_dim=hidden, activation=act), layer_norm_eps=eps, tie_word_embeddings=tie),
    st.integers(1, 4), st.integers(1, 4), st.integers(2, 64), st.integers(1, 32), st.integers(8, 256),
    st.integers(1, 4), st.integers(8, 1000), st.sampled_from(["gelu", "swiglu"]), st.integers(1, 512),
    st.booleans(), st.booleans(), st.floats(1.0, 1e6), st.floats(1e-8, 1e-3),
)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_round_trip_many_configs(cfg):
    cfg.validate()
    text = json.dumps(cfg.to_dict())
    back = HavocConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


def _bad(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ConfigError) as e:
        HavocConfig.load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def _with(path: str, value):
    data = json.loads(json.dumps(NOTES_V1))
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return data


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        HavocConfig.load(tmp_path / "config.json")


def test_invalid_json(tmp_path):
    assert "invalid JSON at line 1" in _bad(tmp_path, '{"vocab_size": 70000,')


def test_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        HavocConfig.load(path)


@pytest.mark.parametrize("key,value,expect", [
    ("attention.num_kv_heads", KeyError, "attention.num_kv_heads: missing key"),
    ("mlp.hidden_dim", KeyError, "mlp.hidden_dim: missing key"),
    ("vocab_size", KeyError, "vocab_size: missing key"),
    ("attention.num_kv_heads", "4", 'attention.num_kv_heads: expected an integer, found "4"'),
    ("attention.bias", 0, "attention.bias: expected true/false, found 0"),
    ("d_model", 2560.0, "d_model: expected an integer, found 2560.0"),
    ("mlp.activation", "relu", 'mlp.activation: expected "gelu" or "swiglu", found "relu"'),
    ("attention", [], "attention: expected an object, found []"),
    ("attention.num_heads", 30, "attention.num_heads: expected a multiple of attention.num_kv_heads (4), found 30"),
    ("attention.rotary_dim", 33, "attention.rotary_dim: expected a positive even integer, found 33"),
    ("attention.rotary_dim", 96, "attention.rotary_dim: expected at most attention.head_dim (80), found 96"),
    ("eos_token_id", 70000, "eos_token_id: expected an id in [0, vocab_size=70000), found 70000"),
    ("dropout", 1.5, "dropout: expected a probability in [0, 1), found 1.5"),
    ("num_layers", 0, "num_layers: expected a positive integer, found 0"),
])
def test_bad_values_name_the_key(tmp_path, key, value, expect):
    assert expect in _bad(tmp_path, _with(key, value))


def test_unknown_keys_name_their_path(tmp_path):
    assert "attention.num_query_groups: unknown key" in _bad(tmp_path, _with("attention.num_query_groups", 8))
    assert "rope_scaling: unknown key" in _bad(tmp_path, _with("rope_scaling", None))


def test_format_version_checked(tmp_path):
    msg = _bad(tmp_path, {**NOTES_V1, "format_version": 7})
    assert "format_version: expected an integer from 1 to 2, found 7" in msg
    # a version-2 file must carry the field the migration would otherwise add
    assert "tie_word_embeddings: missing key" in _bad(tmp_path, {**NOTES_V1, "format_version": 2})
