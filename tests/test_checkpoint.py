"""Checkpoints: self-describing save/load (the seed's bug), atomic writes, precise errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from havoc_core import AttentionConfig, CheckpointError, HavocConfig, HavocModel, MLPConfig
from havoc_core.checkpoint import find_checkpoint, save_model
from havoc_core.model import load_model


def notes_like_config(**kw) -> HavocConfig:
    """The notes' non-default nested shape (32 heads, 4 KV heads, head_dim 80, GELU, hidden 4x),
    at a width a test can afford; head_dim is NOT d_model // num_heads here, as in the bug."""
    base = dict(vocab_size=300, d_model=320, num_layers=2, max_seq_len=64,
                attention=AttentionConfig(num_heads=32, head_dim=80, num_kv_heads=4, rope_theta=5000.0),
                mlp=MLPConfig(hidden_dim=1280, activation="gelu"))
    return HavocConfig(**{**base, **kw})


def test_seed_bug_regression_loads_with_no_other_input(tmp_path):
    cfg = notes_like_config()
    model = HavocModel(cfg).eval()
    save_model(tmp_path / "run" / "checkpoint_step_50000", model)
    # only the path: everything else must come from the checkpoint's own config.json
    loaded = HavocModel.from_pretrained(tmp_path / "run" / "checkpoint_step_50000")
    assert loaded.config == cfg and loaded.config != HavocConfig()
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def test_run_dir_loads_newest_complete_step(tmp_path):
    run = tmp_path / "havoc_phase1_sft"
    for step in (5, 100, 20):
        save_model(run / f"checkpoint_step_{step}", HavocModel(notes_like_config(num_layers=1)))
    (run / ".checkpoint_step_200.tmp-123").mkdir()  # a crashed save is never picked
    (run / "checkpoint_step_300").mkdir()  # nor a dir without config.json
    assert find_checkpoint(run) == run / "checkpoint_step_100"


def test_untied_bias_partial_rotary_round_trip(tmp_path):
    cfg = HavocConfig(vocab_size=50, d_model=48, num_layers=2, max_seq_len=32, tie_word_embeddings=False,
                      attention=AttentionConfig(num_heads=6, num_kv_heads=2, head_dim=8, rotary_dim=4, bias=True),
                      mlp=MLPConfig(hidden_dim=64))
    model = HavocModel(cfg).eval()
    save_model(tmp_path / "ck", model)
    assert "lm_head.weight" in load_file(tmp_path / "ck" / "model.safetensors")
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), load_model(tmp_path / "ck")(idx))


def test_tied_embedding_stored_once(tmp_path):
    save_model(tmp_path / "ck", HavocModel(notes_like_config(num_layers=1)))
    assert "lm_head.weight" not in load_file(tmp_path / "ck" / "model.safetensors")


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path):
    a, b = HavocModel(notes_like_config(num_layers=1)), HavocModel(notes_like_config(num_layers=1))
    save_model(tmp_path / "ck", a)
    save_model(tmp_path / "ck", b)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert torch.equal(load_model(tmp_path / "ck").embed.weight, b.embed.weight)


# --------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ck"
    save_model(path, HavocModel(notes_like_config()))
    return path


def _err(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_dir(tmp_path):
    assert "no such checkpoint" in _err(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json here" in _err(tmp_path / "empty")


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert "model.safetensors: file not found" in _err(ckpt)


def test_truncated_weights(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors: not a valid safetensors file" in _err(ckpt)


def test_not_safetensors(ckpt):
    torch.save({"x": torch.zeros(2)}, ckpt / "model.safetensors")  # a pickle under the right name
    assert "not a valid safetensors file" in _err(ckpt)


def _rewrite_config(ckpt, **changes):
    data = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (ckpt / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("changes,expect", [
    ({"mlp.hidden_dim": 1536}, "mlp.hidden_dim: weights imply 1280, config.json says 1536"),
    ({"attention.head_dim": 64, "attention.rotary_dim": 64},
     "attention.num_heads x attention.head_dim: weights imply 2560, config.json says 2048 (32 x 64)"),
    ({"attention.num_kv_heads": 8}, "attention.num_kv_heads x attention.head_dim: weights imply 320"),
    ({"vocab_size": 400}, "vocab_size: weights imply 300, config.json says 400"),
    ({"d_model": 256}, "d_model: weights imply 320, config.json says 256"),
    ({"num_layers": 3}, "num_layers: weights imply 2, config.json says 3"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings: weights file has no lm_head.weight"),
    ({"attention.bias": True}, "attention.bias: weights file has no layers.0.attn.q_proj.bias"),
])
def test_weights_config_mismatch_names_the_field(ckpt, changes, expect):
    _rewrite_config(ckpt, **changes)
    msg = _err(ckpt)
    assert expect in msg and "model.safetensors" in msg


def test_the_notes_mismatch_message(tmp_path):
    """The seed's exact failure: a 2b-shaped checkpoint read with the code-default nested configs."""
    cfg = notes_like_config(d_model=2560, num_layers=1, mlp=MLPConfig(hidden_dim=10240, activation="gelu"))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in HavocModel(cfg).state_dict().items()}
    wrong = HavocConfig(vocab_size=300, d_model=2560, num_layers=1, max_seq_len=64)  # defaults: 24 heads, 12288
    from havoc_core.checkpoint import check_weights

    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \[2560, 2560\], config.json builds "
                                              r"\[2544, 2560\]: attention.num_heads x attention.head_dim: "
                                              r"weights imply 2560, config.json says 2544 \(24 x 106\)"):
        check_weights(shapes, wrong, "model.safetensors")


def test_extra_parameter(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["layers.0.attn.rotary.inv_freq"] = torch.zeros(4)
    save_file(tensors, ckpt / "model.safetensors")
    assert "unexpected parameter layers.0.attn.rotary.inv_freq" in _err(ckpt)


# --------------------------------------------------------------------------- CLI

def havoc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "havoc_core.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_inspect_preset_and_checkpoint(ckpt):
    out = havoc("inspect", "havoc-2b")
    assert out.returncode == 0, out.stderr
    assert "Model parameters: 2.05B (2,047,080,960)" in out.stdout
    assert "  num_kv_heads: 4" in out.stdout and "  activation: gelu" in out.stdout
    out = havoc("inspect", str(ckpt))
    assert out.returncode == 0 and "head_dim: 80" in out.stdout


def test_cli_init_then_load(tmp_path):
    out = havoc("init", "--preset", "havoc-tiny", "--out", str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr
    assert load_model(tmp_path / "ck").num_parameters() == 5_245_184


def test_cli_errors_are_one_line_exit_2(ckpt, tmp_path):
    _rewrite_config(ckpt, **{"mlp.hidden_dim": 1536})
    (tmp_path / "bad.json").write_text("{oops")
    for args, expect in [(["inspect", "havoc-9b"], "havoc-9b: not a preset"),
                         (["inspect", "--check-weights", str(ckpt)], "mlp.hidden_dim: weights imply 1280"),
                         (["inspect", str(tmp_path / "bad.json")], "bad.json: invalid JSON"),
                         (["init", "--preset", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")],
                          "invalid JSON")]:
        out = havoc(*args)
        assert out.returncode == 2 and expect in out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
