"""The optimizer of a training run: AdamW, or Muon on the blocks' matrices with AdamW for the rest.

Muon (``torch.optim.Muon``) replaces each 2-D weight's momentum by its nearest orthogonal matrix
(Newton-Schulz iterations) before the step; embeddings, the output head, norms and biases stay on
AdamW, the split of modded-nanogpt and Moonshot's Moonlight. Muon's update is rescaled to AdamW's
RMS (``adjust_lr_fn="match_rms_adamw"``), so one ``lr`` and one schedule drive both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never decay norms, biases or the embedding (nanoGPT's split, plus embeddings)."""
    decay = [p for name, p in params if p.dim() >= 2 and "embed" not in name]
    no_decay = [p for name, p in params if not (p.dim() >= 2 and "embed" not in name)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MuonAdamW:
    """Muon for the 2-D weights inside the blocks, AdamW for every other parameter; steps,
    zeroes, schedules and saves as one optimizer."""

    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 fused: bool) -> None:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrices = [p for n, p in params if n.startswith("layers.") and p.dim() == 2]
        rest = [(n, p) for n, p in params if not (n.startswith("layers.") and p.dim() == 2)]
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(param_groups(rest, weight_decay), lr=lr, betas=betas, fused=fused)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, kind: str, lr: float, betas: tuple[float, float], weight_decay: float,
                   fused: bool) -> Any:
    """``torch.optim.AdamW`` or ``MuonAdamW`` over ``model``'s trainable parameters."""
    if kind == "muon":
        return MuonAdamW(model, lr, betas, weight_decay, fused)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=betas, fused=fused)
