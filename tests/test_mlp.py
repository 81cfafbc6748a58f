"""The gated MLP: w2(act(w1 x) * w3 x) with exact GELU (GeGLU) or SiLU (SwiGLU); fusing gate and up
into one matrix changes nothing."""

import pytest
import torch
import torch.nn.functional as F

from havoc_core.mlp import GatedMLP, MLPConfig


@pytest.mark.parametrize("activation,act", [("gelu", F.gelu), ("swiglu", F.silu)])
def test_gated_mlp_is_its_formula(activation, act):
    torch.manual_seed(0)
    mlp = GatedMLP(16, MLPConfig(hidden_dim=40, activation=activation)).eval()
    x = torch.randn(3, 16)
    want = (act(x @ mlp.w1.weight.T) * (x @ mlp.w3.weight.T)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    if activation == "gelu":  # exact (erf) GELU, as transformers' "gelu", not the tanh approximation
        tanh = (F.gelu(x @ mlp.w1.weight.T, approximate="tanh") * (x @ mlp.w3.weight.T)) @ mlp.w2.weight.T
        assert not torch.allclose(mlp(x), tanh, atol=1e-7)
    before = mlp(x)
    mlp.fuse_projections()
    assert mlp.w13 is not None and not hasattr(mlp, "w1")
    torch.testing.assert_close(mlp(x), before, atol=1e-6, rtol=1e-6)


def test_three_matrices_for_both_activations():
    """Both are gated: that is what makes havoc-2b 2.05B parameters."""
    for activation in ("gelu", "swiglu"):
        mlp = GatedMLP(8, MLPConfig(hidden_dim=12, activation=activation))
        assert sum(p.numel() for p in mlp.parameters()) == 3 * 8 * 12
