"""Attention: the config resolves its own derived sizes, RoPE matches its definition, and grouped-
query attention equals plain multi-head attention over repeated KV heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from havoc_core.attention import Attention, AttentionConfig, apply_rope, rope_cos_sin


def test_config_resolves_head_and_rotary_dims():
    assert AttentionConfig(num_heads=24).dims(2560) == (106, 106)  # the seed's 2544-row q_proj: 24 x 106
    resolved = AttentionConfig(num_heads=32, head_dim=80, rotary_dim=None).resolved(2560)
    assert (resolved.head_dim, resolved.rotary_dim) == (80, 80)
    assert AttentionConfig(num_heads=4, head_dim=None, rotary_dim=8).resolved(64).head_dim == 16
    assert AttentionConfig(num_heads=0).resolved(64).head_dim is None  # left for validation to name


def test_rope_angles_are_position_times_frequency():
    """cos/sin at position p, pair j: cos(p * theta^(-2j/r)) in float32, whatever the output dtype;
    the tables hold (cos, cos) and (-sin, sin)."""
    positions = torch.tensor([0, 1, 7, 1023])
    cos, sin = rope_cos_sin(positions, rotary_dim=8, theta=10000.0, dtype=torch.float32)
    for i, p in enumerate(positions.tolist()):
        for j in range(4):
            angle = p * 10000.0 ** (-2 * j / 8)
            assert math.isclose(cos[i, 0, j].item(), math.cos(angle), abs_tol=1e-4)
            assert math.isclose(sin[i, 1, j].item(), math.sin(angle), abs_tol=1e-4)
    assert torch.equal(cos[:, 0], cos[:, 1]) and torch.equal(sin[:, 0], -sin[:, 1])
    half, _ = rope_cos_sin(positions, 8, 10000.0, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), cos, atol=1e-2)


def test_rope_rotates_pairs_and_keeps_partial_channels():
    x = torch.randn(1, 2, 3, 10)
    cos, sin = rope_cos_sin(torch.arange(3), rotary_dim=6, theta=500.0, dtype=torch.float32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 6:], x[..., 6:])  # partial rotary: the rest passes through
    norms = (x[..., :3] ** 2 + x[..., 3:6] ** 2), (y[..., :3] ** 2 + y[..., 3:6] ** 2)
    torch.testing.assert_close(norms[1], norms[0])  # a rotation keeps each pair's length
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: no rotation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_rotate_half_bit_for_bit(dtype):
    """The 4-op rotation gives exactly (x1 cos - x2 sin, x2 cos + x1 sin), per row positions too."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16).to(dtype)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    cos, sin = rope_cos_sin(positions, 16, 10000.0, dtype)
    c, s = cos[:, None, :, 0], sin[:, None, :, 1]
    x1, x2 = x[..., :8], x[..., 8:]
    assert torch.equal(apply_rope(x, cos[:, None], sin[:, None]), torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1))


@pytest.mark.parametrize("heads,kv", [(4, 2), (8, 1), (4, 4)])
def test_grouped_query_attention_equals_repeated_heads(heads, kv):
    torch.manual_seed(0)
    attn = Attention(32, AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=8)).eval()
    x = torch.randn(2, 5, 32)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0, torch.float32)
    got = attn(x, cos, sin)
    B, T, H, D = 2, 5, heads, 8
    q = apply_rope(attn.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, kv, D).transpose(1, 2), cos, sin).repeat_interleave(heads // kv, 1)
    v = attn.v_proj(x).view(B, T, kv, D).transpose(1, 2).repeat_interleave(heads // kv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    want = attn.o_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused = Attention(32, AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=8)).eval()
    fused.load_state_dict(attn.state_dict())
    fused.fuse_projections()
    torch.testing.assert_close(fused(x, cos, sin), got, atol=1e-5, rtol=1e-5)
