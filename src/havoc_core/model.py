"""HavocModel: token embedding -> pre-norm decoder blocks (RMSNorm, GQA + RoPE, gated MLP)
-> final RMSNorm -> lm_head (tied to the embedding by default)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from havoc_core.attention import Attention, KVCache, rope_tables
from havoc_core.config import HavocConfig
from havoc_core.mlp import GatedMLP

IGNORE_INDEX = -100


class Block(nn.Module):
    def __init__(self, cfg: HavocConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.d_model, cfg.attention)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.mlp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int | Tensor,
                mask: Tensor | None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, start, mask))
        return x + self.mlp(self.mlp_norm(x))


class HavocModel(nn.Module):
    def __init__(self, config: HavocConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.reset_rope()
        if self.embed.weight.device.type != "meta":
            self.apply(self._init_weights)

    def reset_rope(self) -> None:
        """(Re)build the RoPE table on the weights' device, e.g. after loading onto a meta model."""
        a = self.config.attention
        assert a.rotary_dim is not None
        device = self.embed.weight.device
        self.rope = rope_tables(a.rotary_dim, a.rope_theta, self.config.max_seq_len, device=device)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for matrices; residual output projections scaled down by
        1/sqrt(2 * num_layers) (GPT-2) so the residual stream does not grow with depth."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Block):
            for w in (module.attn.o_proj.weight, module.mlp.w2.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.config.num_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, max_len: int | None = None,
                   dtype: torch.dtype | None = None) -> list[KVCache]:
        """One preallocated KV cache per layer, for ``max_len`` positions (default: the context)."""
        a = self.config.attention
        assert a.head_dim is not None
        w = self.embed.weight
        return [KVCache(batch_size, a.num_kv_heads, max_len or self.config.max_seq_len, a.head_dim,
                        dtype or w.dtype, w.device) for _ in self.layers]

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: list[KVCache] | None = None,
                start: int | Tensor = 0, positions: Tensor | None = None, mask: Tensor | None = None,
                last_only: bool = False, logits_at: Tensor | None = None,
                compute_dtype: torch.dtype | None = None) -> Tensor:
        """idx [B, T] token ids -> logits [B, T, V] (or [B, 1, V] with ``last_only``).

        With ``targets`` [B, T] (``-100`` = ignore) it returns the mean cross-entropy instead, so a
        DDP/FSDP wrapper sees the loss come out of ``forward``. With ``cache``, the tokens occupy
        positions ``start .. start+T-1``; ``positions`` [B, T] overrides the RoPE positions (left-padded
        batches) and ``mask`` (bool, True = may attend, broadcastable to [B, H, T, S]) the causal mask.
        A [B] tensor ``start`` gives every row its own cache position (slot-based batch decoding; pass
        ``mask``). ``logits_at`` [B] returns [B, 1, V] for one position per row (right-padded rows).
        ``compute_dtype`` sets the activations' dtype (e.g. an fp32 prefill of bf16 weights).
        """
        T = idx.shape[1]
        if isinstance(start, Tensor):
            if positions is None:
                positions = start[:, None] + torch.arange(T, device=idx.device)
        elif start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if positions is None:
            table = self.rope[start : start + T]
            cos, sin = table[:, 0], table[:, 1]
        else:
            table = self.rope[positions].unsqueeze(1)  # [B, 1, T, 2, r/2]
            cos, sin = table[..., 0, :], table[..., 1, :]
        x = self.embed(idx)
        if compute_dtype is not None:
            x = x.to(compute_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i] if cache is not None else None, start, mask)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        # the head sees a 2-D input: a [1, 1, d] slice of [1, T, d] keeps its stride of T * d, and with
        # it oneDNN's bf16 matmul copies the whole transposed head (0.9 s vs 19 ms on havoc-2b, LOG.md)
        h = x.reshape(-1, x.shape[-1])
        logits = F.linear(h, self.embed.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(h)
        logits = logits.view(*x.shape[:-1], -1)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> HavocModel:
        """Load a checkpoint dir (or a run dir: its newest checkpoint) with its own complete config."""
        from havoc_core.checkpoint import load_model

        return load_model(path, device=device, dtype=dtype)
