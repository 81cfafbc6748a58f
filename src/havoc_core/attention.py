"""Grouped-query attention with rotary position embeddings (RoPE) and an optional KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionConfig:
    """Attention shape. ``head_dim``/``rotary_dim`` of None are resolved by ``HavocConfig``
    (to d_model // num_heads and to head_dim) and then stored explicitly in config.json."""

    num_heads: int = 24
    head_dim: int | None = None
    num_kv_heads: int = 4
    dropout: float = 0.0
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    bias: bool = False


def rope_tables(rotary_dim: int, theta: float, max_len: int, device: torch.device | None = None) -> Tensor:
    """cos/sin for every position, shape [max_len, 2, rotary_dim // 2], computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of x [B, H, T, D] ("rotate-half" pairing,
    as in Llama/HF); the remaining channels (partial rotary) pass through unchanged."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rest.shape[-1]:
        rotated.append(rest)
    return torch.cat(rotated, dim=-1)


class KVCache:
    """Preallocated keys/values for one layer: [batch, num_kv_heads, max_len, head_dim].

    Only the KV heads are cached (grouped-query attention); the query heads share them.
    """

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, n_kv, T, hd] at positions ``start ..`` and return what to attend to, in
        k's dtype (so a bf16 cache also serves an fp32 prefill). ``start`` is an int (every row
        alike; returns positions [0, start + T)) or a [B] tensor, one start per row (slot-based
        batch decoding; returns the whole buffer, which the caller masks)."""
        if isinstance(start, Tensor):
            self.write_rows(torch.arange(k.shape[0], device=k.device), start, k, v)
            return self.k.to(k.dtype), self.v.to(v.dtype)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)

    def write_rows(self, rows: Tensor, start: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k/v [B, n_kv, T, hd] into batch rows ``rows`` [B], row b at positions start[b] ..."""
        cols = start[:, None] + torch.arange(k.shape[2], device=k.device)
        self.k[rows[:, None], :, cols] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, cols] = v.transpose(1, 2).to(self.v.dtype)

    def view(self, rows: slice, length: int) -> KVCache:
        """A cache sharing this one's storage: batch rows ``rows``, positions [0, length)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[rows, :, :length], self.v[rows, :, :length]
        return view


class Attention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None, "resolve the config through HavocConfig first"
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(d_model, cfg.num_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d_model, bias=cfg.bias)
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                start: int | Tensor = 0, mask: Tensor | None = None) -> Tensor:
        """x [B, T, d_model]; cos/sin [T, r/2] or [B, 1, T, r/2]; mask: bool, True = may attend,
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
            k, v = cache.update(start, k, v)
        S, groups = k.shape[2], self.num_heads // self.num_kv_heads
        dropout = self.dropout if self.training else 0.0
        if T == 1 and groups > 1 and (mask is None or mask.shape[1] == 1):
            # Decode: fold each KV head's query group into the query axis; no K/V copy
            # (SDPA's enable_gqa measured 2-50x slower on CPU, docs/LOG.md).
            qg = q.reshape(B, self.num_kv_heads, groups, self.head_dim)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout)
            y = y.reshape(B, self.num_heads, 1, self.head_dim)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            is_causal = mask is None and T > 1
            if is_causal and S != T:  # continuing a cached sequence with several new tokens
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                is_causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
