"""A Llama in the style of Meta's reference code and torchtitan: RMSNorm, rotary embeddings
applied through complex numbers, SwiGLU feed-forward and grouped-query attention.

Plain PyTorch with nothing fxpar-specific. Attention reshapes with the configured head counts
(``view(bsz, seqlen, self.n_local_heads, self.head_dim)``) and repeats key/value heads with
``expand`` + ``reshape`` before scaled-dot-product attention.

For generation, ``model.setup_caches(max_batch_size, max_seq_len)`` gives every attention a
key/value cache as gpt-fast writes one (buffers filled in place at the positions given,
``cache[:, input_pos] = xk``) and ``model(tokens, input_pos)`` runs the tokens at those positions
against everything cached before them.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many key/value heads as query heads
    vocab_size: int = 32000
    multiple_of: int = 256  # make the SwiGLU hidden layer size a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64, (end, dim // 2)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor):
    ndim = x.ndim
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class KVCache(nn.Module):
    """The keys and values of every position so far, ``(batch, position, kv head, head dim)``."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
        self.cache_k[:, input_pos] = xk
        self.cache_v[:, input_pos] = xv
        return self.cache_k, self.cache_v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = self.n_kv_heads
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos=None, mask=None):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        if input_pos is not None:  # everything cached so far, this step's tokens written in
            xk, xv = self.cache.update(input_pos, xk, xv)
        keys = repeat_kv(xk, self.n_rep)  # (bs, seqlen, n_local_heads, head_dim)
        values = repeat_kv(xv, self.n_rep)
        xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
        keys = keys.transpose(1, 2)
        values = values.transpose(1, 2)
        if mask is None:
            output = F.scaled_dot_product_attention(xq, keys, values, is_causal=True)
        else:
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(
            dim=args.dim,
            hidden_dim=4 * args.dim,
            multiple_of=args.multiple_of,
            ffn_dim_multiplier=args.ffn_dim_multiplier,
        )
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList([TransformerBlock(i, params) for i in range(params.n_layers)])
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # a buffer, not recomputed per step; non-persistent so checkpoints stay weight-only
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta),
            persistent=False,
        )

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """Give every attention a key/value cache for batches of ``max_batch_size`` sequences of
        up to ``max_seq_len`` positions, in the dtype and on the device of the weights."""
        weight = self.output.weight
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(max_batch_size, max_seq_len, a.n_local_kv_heads, a.head_dim, weight.dtype, weight.device)
        causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=weight.device))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None):
        """Logits for ``tokens``; with ``input_pos`` (after ``setup_caches``), the tokens are at
        those positions and attend to every position cached up to them."""
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        if input_pos is None:
            freqs_cis, mask = self.freqs_cis[:seqlen], None
        else:
            freqs_cis, mask = self.freqs_cis[input_pos], self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        h = self.norm(h)
        return self.output(h).float()


def build(**overrides):
    """A small Llama and an example batch: ``model, (tokens,) = build(n_layers=2)``."""
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)
    cfg.update(overrides)
    args = ModelArgs(**cfg)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    return model, (tokens,)
