"""HavocModel: the config's analytic parameter shapes are the model's, the training forward pass
returns logits or the loss, the context limit holds, and from_pretrained loads any checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from havoc_core import PRESETS, AttentionConfig, HavocConfig, HavocError, HavocModel, MLPConfig
from havoc_core.checkpoint import save_model
from havoc_core.model import IGNORE_INDEX


def meta_shapes(cfg: HavocConfig) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        return [(k, tuple(v.shape)) for k, v in HavocModel(cfg).state_dict().items()]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_shapes_are_the_models(name):
    cfg = PRESETS[name]
    assert list(cfg.param_shapes().items()) == meta_shapes(cfg)


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([(4, 2), (4, 4), (8, 1)]), head_dim=st.sampled_from([None, 8, 12]),
       bias=st.booleans(), tie=st.booleans(), layers=st.integers(1, 3), activation=st.sampled_from(["gelu", "swiglu"]))
def test_param_shapes_for_any_config(heads, head_dim, bias, tie, layers, activation):
    cfg = HavocConfig(vocab_size=50, d_model=32, num_layers=layers, max_seq_len=16, tie_word_embeddings=tie,
                      attention=AttentionConfig(num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                                bias=bias),
                      mlp=MLPConfig(hidden_dim=24, activation=activation))
    assert list(cfg.param_shapes().items()) == meta_shapes(cfg)


def test_forward_gives_logits_or_the_masked_loss(tiny_model):
    model = tiny_model()
    idx = torch.randint(6, 1024, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 1024)
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = IGNORE_INDEX
    want = F.cross_entropy(logits[:, :-3].reshape(-1, 1024), targets[:, :-3].reshape(-1))
    torch.testing.assert_close(model(idx, targets), want)


def test_longer_than_the_context_is_refused(tiny_model):
    model = tiny_model(max_seq_len=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(HavocError, match="17 tokens exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_an_absurd_context_allocates_nothing():
    """No table is sized by max_seq_len: a model with a 10^12-token context builds and runs."""
    cfg = HavocConfig(vocab_size=64, d_model=16, num_layers=1, max_seq_len=10**12,
                      attention=AttentionConfig(num_heads=2, num_kv_heads=1), mlp=MLPConfig(hidden_dim=32))
    assert HavocModel(cfg)(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)


def test_from_pretrained_loads_a_run_or_a_step(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    save_model(tmp_path / "run" / "checkpoint_step_3", model)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint_step_3"):
        loaded = HavocModel.from_pretrained(path)
        assert loaded.config == model.config and not loaded.training
        idx = torch.randint(0, 1024, (1, 8))
        assert torch.equal(loaded(idx), model(idx))
    half = HavocModel.from_pretrained(tmp_path / "run", dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16
