"""Gated feed-forward block: w2(act(w1 x) * w3 x), with GELU (GeGLU) or SiLU (SwiGLU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["gelu", "swiglu"]


@dataclass
class MLPConfig:
    """Both activations are gated (three matrices): that is what the 2.05B "havoc-2b" count needs."""

    hidden_dim: int = 12288
    activation: Activation = "swiglu"
    dropout: float = 0.0


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(d_model, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, d_model, bias=False)  # down
        self.act = F.silu if cfg.activation == "swiglu" else F.gelu  # exact (erf) GELU, as HF "gelu"
        self.dropout = nn.Dropout(cfg.dropout)
        self.w13: nn.Linear | None = None  # gate and up in one matrix: see fuse_projections

    def fuse_projections(self) -> None:
        """Replace w1/w3 by one matrix (inference): one matmul per step instead of two. Done once."""
        if self.w13 is not None:
            return
        w = torch.cat([self.w1.weight.data, self.w3.weight.data])
        self.w13 = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.w13.weight.data = w
        del self.w1, self.w3

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        y = self.w2(self.act(gate) * up)
        return self.dropout(y) if self.training else y
