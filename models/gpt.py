"""A GPT-2 in the style of nanoGPT: one file, plain PyTorch, nothing fxpar-specific.

The attention reshapes with literal head counts (``view(B, T, self.n_head, C // self.n_head)``),
the token embedding is tied to the output projection, and q/k/v come from one fused linear
that is split afterwards: the shapes a tensor-parallel rewrite has to get right by itself.

For generation, ``model.setup_caches(max_batch_size, max_seq_len)`` gives every attention a
key/value cache (buffers filled in place with ``index_copy_`` at the positions given, as Hugging
Face's static cache fills its own) and ``model(idx, input_pos=...)`` runs the tokens at those
positions against everything cached before them.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    flash: bool = True  # False: explicit matmul-softmax attention with a causal-mask buffer


class KVCache(nn.Module):
    """The keys and values of every position so far, ``(batch, head, position, head size)``."""

    def __init__(self, max_batch_size: int, n_head: int, max_seq_len: int, head_size: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        self.cache = None
        if not self.flash:
            # causal mask so that attention is only applied to the left in the input sequence
            mask = torch.tril(torch.ones(config.block_size, config.block_size))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x, input_pos=None, mask=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is not None:  # everything cached so far, this step's tokens written in
            k, v = self.cache.update(input_pos, k, v)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0, is_causal=mask is None
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if mask is None:
                att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            else:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None, mask=None):
        x = x + self.attn(self.ln_1(x), input_pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # scaled init of the residual projections, per GPT-2
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """Give every attention a key/value cache for batches of ``max_batch_size`` sequences of
        up to ``max_seq_len`` positions, in the dtype and on the device of the weights."""
        weight = self.lm_head.weight
        for block in self.transformer.h:
            a = block.attn
            a.cache = KVCache(max_batch_size, a.n_head, max_seq_len, a.n_embd // a.n_head, weight.dtype, weight.device)
        causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=weight.device))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, idx, targets=None, input_pos=None):
        b, t = idx.size()
        if input_pos is None:
            pos, mask = torch.arange(0, t, dtype=torch.long, device=idx.device), None  # shape (t)
        else:  # after setup_caches: the tokens at these positions, attending to the cache
            pos, mask = input_pos, self.causal_mask[None, None, input_pos]
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, input_pos, mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def build(**overrides):
    """A small GPT and an example batch: ``model, (idx,) = build(n_layer=2)``."""
    cfg = dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)
    cfg.update(overrides)
    config = GPTConfig(**cfg)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, min(16, config.block_size)))
    return model, (idx,)
