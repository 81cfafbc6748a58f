"""HavocModel: token embedding -> pre-norm decoder blocks (RMSNorm, GQA + RoPE, gated MLP)
-> final RMSNorm -> lm_head (tied to the embedding by default)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from havoc_core.attention import Attention, LayerCache, rope_cos_sin
from havoc_core.checkpoint import CONFIG_FILE, find_checkpoint, load_weights
from havoc_core.config import HavocConfig
from havoc_core.errors import HavocError
from havoc_core.kv_cache import CacheView, KVCache
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, cache, mask)
        x = x + (self.dropout(h) if self.training else h)  # (a decode step skips the no-op call)
        return x + self.mlp(self.mlp_norm(x))


class HavocModel(nn.Module):
    def __init__(self, config: HavocConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.embed.weight.device.type != "meta":
            self.apply(self._init_weights)

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

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache of ``batch_size`` rows and ``max_len`` positions (default: the context)."""
        c = self.config
        head_dim, _ = c.attention.dims(c.d_model)
        w = self.embed.weight
        length, dtype = max_len or c.max_seq_len, dtype or w.dtype
        # max_seq_len is the one size the weights do not imply: an absurd one is refused here, in one
        # line, rather than by the allocator's RuntimeError
        need = 2 * c.num_layers * batch_size * c.attention.num_kv_heads * length * head_dim * dtype.itemsize
        have = (torch.cuda.mem_get_info(w.device)[1] if w.device.type == "cuda"
                else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        why = (f"KV cache for {batch_size} x {length:,} positions (max_seq_len={c.max_seq_len}) needs "
               f"{need / 2**30:,.1f} GiB, this {w.device.type} has {have / 2**30:,.1f} GiB")
        if need > have:
            raise HavocError(why)
        try:
            return KVCache(c.num_layers, batch_size, c.attention.num_kv_heads, length, head_dim, dtype, w.device)
        except RuntimeError as e:  # torch.OutOfMemoryError included
            raise HavocError(f"{why}: allocation failed ({str(e).splitlines()[0][:120]})") from None

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: CacheView | None = None) -> Tensor:
        """idx [B, T] token ids -> logits [B, T, V].

        With ``targets`` [B, T] (``-100`` = ignore) it returns the mean cross-entropy instead, so a
        DDP/FSDP wrapper sees the loss come out of ``forward``. Inference passes ``cache`` (from
        ``KVCache.view``): the rows and positions the tokens continue, and which logits to return.
        """
        T = idx.shape[1]
        x = self.embed(idx)
        if cache is None:
            if T > self.config.max_seq_len:
                raise HavocError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            positions, mask, layers = torch.arange(T, device=idx.device), None, [None] * len(self.layers)
        else:
            positions, mask, layers = cache.prepare(T)
            if cache.dtype is not None:
                x = x.to(cache.dtype)
        a = self.config.attention
        _, rotary_dim = a.dims(self.config.d_model)
        cos, sin = rope_cos_sin(positions, rotary_dim, a.rope_theta, x.dtype)
        if positions.dim() == 2:  # one row of positions per sequence: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        for layer, layer_cache in zip(self.layers, layers, strict=True):
            x = layer(x, cos, sin, layer_cache, mask)
        x = self.norm(x)
        if cache is not None and isinstance(cache.logits_at, int):
            x = x[:, cache.logits_at :][:, :1]
        elif cache is not None and cache.logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), cache.logits_at][:, None]
        logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def head(self, x: Tensor) -> Tensor:
        """Logits of hidden states x [..., d_model]. The head sees a 2-D input: a [1, 1, d] slice of
        [1, T, d] keeps its stride of T * d, and with it oneDNN's bf16 matmul copies the whole
        transposed head (0.9 s vs 19 ms on havoc-2b, docs/LOG.md)."""
        h = x.reshape(-1, x.shape[-1])
        logits = F.linear(h, self.embed.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(h)
        return logits.view(*x.shape[:-1], -1)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> HavocModel:
        """Load a checkpoint dir (or a run dir: its newest checkpoint) with its own complete config."""
        return load_model(path, device=device, dtype=dtype)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               check_hashes: bool = True) -> HavocModel:
    """Build the model from the checkpoint's own config.json (nothing from defaults) and load it;
    every name and shape is checked against the config before anything is allocated, then every
    byte against checksums.json (unless ``check_hashes`` is false: the caller verifies)."""
    ckpt = find_checkpoint(path)
    cfg = HavocConfig.load(ckpt / CONFIG_FILE)
    state = load_weights(ckpt, cfg, device, check_hashes=check_hashes)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = HavocModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
