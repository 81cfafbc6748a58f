"""Grouped-query attention with rotary position embeddings (RoPE), reading and writing a KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionConfig:
    """Attention shape. ``head_dim`` None means d_model // num_heads and ``rotary_dim`` None means
    the whole head; ``HavocConfig`` stores the resolved values, so config.json is explicit."""

    num_heads: int = 24
    head_dim: int | None = None
    num_kv_heads: int = 4
    dropout: float = 0.0
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    bias: bool = False

    def dims(self, d_model: int) -> tuple[int, int]:
        """``(head_dim, rotary_dim)`` for a model of width ``d_model``, defaults applied."""
        head = self.head_dim if self.head_dim is not None else d_model // max(self.num_heads, 1)
        return head, self.rotary_dim if self.rotary_dim is not None else head

    def resolved(self, d_model: int) -> AttentionConfig:
        """This config with ``head_dim`` and ``rotary_dim`` filled in (left None while num_heads is
        not positive, so that validation can name the real error)."""
        if self.num_heads <= 0:
            return self
        head, rotary = self.dims(d_model)
        return dataclasses.replace(self, head_dim=head, rotary_dim=rotary)


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The rotation tables of every position, [..., T, 2, rotary_dim // 2]: cos as (cos, cos) and sin
    as (-sin, sin), so that ``apply_rope`` rotates both halves in three arithmetic ops. Computed in
    float32 from the positions themselves: no table sized by the context length (an absurd
    max_seq_len allocates nothing), and the angles stay exact whatever dtype the model was cast to."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, cos], -2).to(dtype), torch.stack([-sin, sin], -2).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``rotary_dim`` channels of x [B, H, T, D] ("rotate-half" pairing, as in
    Llama/HF: channel j with j + rotary_dim / 2); the remaining channels (partial rotary) pass
    through. With the tables of ``rope_cos_sin`` this is (x1 cos - x2 sin, x2 cos + x1 sin) exactly,
    in 4 ops instead of 10: a decode step pays per op, not per element."""
    rotary = 2 * cos.shape[-1]
    pairs = (x if rotary == x.shape[-1] else x[..., :rotary]).unflatten(-1, (2, rotary // 2))
    y = (pairs * cos + pairs.flip(-2) * sin).flatten(-2)
    return y if rotary == x.shape[-1] else torch.cat([y, x[..., rotary:]], dim=-1)


class LayerCache(Protocol):
    """One layer's share of a KV cache during one forward pass (``kv_cache.LayerView``). ``runs``:
    for rows at different positions or lengths, (first row, end row, cached tokens, new tokens,
    mask) of each run of alike rows, attended as a pass of those rows alone would be; else None."""

    runs: list[tuple[int, int, int, int, Tensor | None]] | None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class Attention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig) -> None:
        super().__init__()
        self.head_dim, _ = cfg.dims(d_model)
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(d_model, cfg.num_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, cfg.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, cfg.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, d_model, bias=cfg.bias)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matrix: see fuse_projections

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one matrix (inference): one matmul and one rotation per step
        instead of three and two. Done once; the model cannot be trained or saved afterwards."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                          device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        fused.weight.data = torch.cat([p.weight.data for p in parts])
        if fused.bias is not None:
            fused.bias.data = torch.cat([p.bias.data for p in parts])  # type: ignore[union-attr]
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x [B, T, d_model]; cos/sin [T, 2, r/2] or [B, 1, T, 2, r/2]; mask: bool, True = may attend,
        broadcastable to [B, H, T, S]. Without a mask the attention is causal."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # inference: one matmul, and one rotation for the q and k heads together
            qk, v = self.qkv_proj(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
            q, k = apply_rope(qk.view(B, T, H + Hkv, D).transpose(1, 2), cos, sin).split([H, Hkv], dim=1)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)  # (in the cache's dtype)
        # Inference on CPU attends in fp32: a bf16 kernel's result for a query depends on the queries
        # and keys beside it in the call, so a prompt prefilled whole or after a cached prefix
        # differed (76 of 577 splits of havoc-tiny prompts; in fp32 none), and with it a seeded reply
        up = cache is not None and q.dtype != torch.float32 and q.device.type == "cpu"
        out_dtype, q = q.dtype, q.float() if up else q
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if cache is not None and cache.runs is not None:
            # Each run of rows over exactly its own keys and queries, as alone: one call over the
            # longest row, the others' padding masked, rounds differently, so a seeded request's
            # tokens depended on the requests beside it (`havoc serve` in bf16, 32 slots: 59% of 256
            # seeded replies). Padding queries get zeros (their outputs are never read).
            parts = []
            for b, e, s, n, m in cache.runs:
                y = self._attend(q[b:e, :, :n], k[b:e, :, : s + n], v[b:e, :, : s + n], m, n)
                parts.append(y if n == T else F.pad(y, (0, 0, 0, T - n)))
            y = torch.cat(parts)
        else:
            y = self._attend(q, k, v, mask, T)
        y = y if y.dtype == out_dtype else y.to(out_dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, T: int) -> Tensor:
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        groups = H // Hkv
        dropout = self.dropout if self.training else 0.0
        if T == 1 and groups > 1 and (mask is None or mask.shape[1] == 1):
            # Decode: fold each KV head's query group into the query axis; no K/V copy
            # (SDPA's enable_gqa measured 2-50x slower on CPU, docs/LOG.md).
            qg = q.reshape(B, Hkv, groups, D)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout)
            y = y.reshape(B, H, 1, D)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               dropout_p=dropout)
        return y
