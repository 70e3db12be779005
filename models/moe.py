"""A mixture-of-experts decoder in the style of Mixtral and torchtitan's MoE: the Llama of
``models/llama.py`` with each feed-forward replaced by a top-k router over a list of SwiGLU
experts.

The experts are written as users write them: an ``nn.ModuleList`` of small MLPs, a loop over
them, each taking the rows its router picked (``torch.where(indices == e)``, a data-dependent
number of tokens) and adding its weighted output back with ``index_add``. No capacity: every
token reaches its k experts, as in the single-device model.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxpar.models import llama
from fxpar.models.llama import Attention, ModelArgs, RMSNorm


@dataclass
class MoEArgs(ModelArgs):
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 14336  # each expert's SwiGLU width (Mixtral 8x7B)


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):  # (tokens, dim), tokens chosen by the router
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        self.top_k = args.top_k
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(args.dim, args.expert_hidden) for _ in range(args.n_experts))

    def forward(self, x):
        bsz, seqlen, dim = x.shape
        x = x.view(-1, dim)  # (bsz * seqlen, dim)
        probs = self.gate(x).softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(bsz, seqlen, dim)


class Block(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        self.attention = Attention(args)
        self.moe = MoE(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.moe_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.moe(self.moe_norm(h))


class Transformer(llama.Transformer):
    """The Llama, each block's feed-forward a mixture of experts."""

    def __init__(self, params: MoEArgs):
        super().__init__(params)
        self.layers = nn.ModuleList(Block(params) for _ in range(params.n_layers))


def build(**overrides):
    """A small MoE decoder and an example batch: ``model, (tokens,) = build(n_experts=4)``."""
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64,
               n_experts=4, top_k=2, expert_hidden=64)
    cfg.update(overrides)
    args = MoEArgs(**cfg)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    return model, (tokens,)
