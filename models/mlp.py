"""A plain multi-layer perceptron: Linear -> activation -> Linear blocks with residuals and a
LayerNorm, as found in countless training scripts."""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class MLPConfig:
    d_in: int = 32
    d_model: int = 64
    d_hidden: int = 256
    d_out: int = 16
    n_blocks: int = 2
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.d_hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.d_in, cfg.d_model)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_blocks)])
        self.head = nn.Linear(cfg.d_model, cfg.d_out)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


def build(**overrides):
    """A small MLP and an example batch: ``model, (x,) = build(n_blocks=3)``."""
    cfg = MLPConfig(**overrides)
    return MLP(cfg), (torch.randn(8, cfg.d_in),)
