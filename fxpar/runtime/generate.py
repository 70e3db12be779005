"""Generation with a key/value cache: ``pm.generate``.

Two programs do the work: one runs the prompt (all its positions at once, filling the cache) and
one runs a single new token per sequence against the cache. Each is captured once, at its first
call, and reused: decoding never captures again, however many tokens it makes. The cache lives
in the model's buffers, placed by the planner like the keys and values written into it (a rank
holds its own key/value heads only), and is filled in place.

A model tells how it takes positions by its forward's signature: gpt-fast's and fxpar's reference
models take ``model(tokens, input_pos)`` after ``model.setup_caches(max_batch_size, max_seq_len)``;
a Hugging Face model, which takes a cache object, runs with a static cache fxpar gives it as
buffers (``fxpar/static_cache.py``), prompts left-padded as their attention mask says.

Sampling draws from a generator seeded alike on every rank, over logits that are the same on every
rank (gathered after the last layer), so every tensor-parallel rank draws the same tokens.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import CaptureError, FxparError
from ..static_cache import cache_argument, with_static_cache
from .agree import agree, differences


def generate(pm, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask=None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             pad_token_id: int | None = None, seed: int = 0) -> torch.Tensor:
    """``pm.generate``: see ``ParallelModule.generate``."""
    _check(input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p)
    # a rank that would make another number of steps than its peers would leave them waiting
    mask_shape = None if attention_mask is None else list(attention_mask.shape)
    agree(pm._cache.everyone, {
        "input_ids": list(input_ids.shape), "attention_mask": mask_shape, "max_new_tokens": max_new_tokens,
        "do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "seed": seed,
    }, _explain)
    steps = _steps(pm, input_ids, attention_mask, max_new_tokens)
    # a Hugging Face model's own generation settings, as its generate takes them
    defaults = getattr(pm._cache.skeleton, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(defaults, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(defaults, "pad_token_id", None)
    eos = _as_ids(eos_token_id, input_ids.device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0]) if eos is not None else 0
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if do_sample else None
    out = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    was_training = pm.training
    pm.eval()
    try:
        with torch.no_grad():
            logits = steps.prompt()
            for i in range(max_new_tokens):
                token = pick(logits, do_sample, temperature, top_k, top_p, generator)
                token = torch.where(finished, torch.full_like(token, pad), token)
                out.append(token[:, None])
                if eos is not None:
                    finished |= torch.isin(token, eos)
                    if bool(finished.all()):
                        break
                if i + 1 < max_new_tokens:
                    logits = steps.next(token)
    finally:
        pm.train(was_training)
    return torch.cat(out, dim=1)


def pick(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence from its logits ``(batch, vocab)``: the most likely one, or
    a draw after temperature, top-k and top-p (nucleus) filtering, in the order Hugging Face's
    ``generate`` applies them."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)
        dropped = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        dropped[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _steps(pm, input_ids, attention_mask, max_new_tokens: int):
    """The model's way of running a prompt and then one token at a time, from its forward."""
    skeleton = pm._cache.skeleton
    name = type(skeleton).__name__
    if "input_pos" in inspect.signature(skeleton.forward).parameters:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise FxparError(
                f"{name}.forward takes no attention mask, so pm.generate cannot run padded prompts through it "
                "(an attention_mask with zeros): generate for prompts of one length at a time"
            )
        if pm._microbatches > 1:
            raise FxparError(
                f"{name} keeps its own key/value cache for the whole batch, which microbatches of it cannot share: "
                "generate with microbatches=1 (a Hugging Face model's cache, which fxpar makes, takes microbatches)"
            )
        return _Positions(pm, input_ids)
    if cache_argument(skeleton) is not None and hasattr(skeleton, "config"):
        return _StaticCache(pm, input_ids, attention_mask, max_new_tokens)
    raise FxparError(
        f"pm.generate needs a model that runs a few positions at a time against a key/value cache; "
        f"{name}.forward{inspect.signature(skeleton.forward)} takes no positions. Give it a cache the way "
        "gpt-fast does (model.setup_caches(max_batch_size, max_seq_len), forward(tokens, input_pos)), as "
        "fxpar.models.llama does; Hugging Face models need nothing"
    )


class _Positions:
    """gpt-fast's way: ``model(tokens, input_pos)`` writes the tokens' keys and values into the
    cache buffers the model set up itself, at ``input_pos``."""

    def __init__(self, pm, input_ids):
        self.pm, self.ids, self.at = pm, input_ids, input_ids.shape[1]

    def prompt(self) -> torch.Tensor:
        positions = torch.arange(self.at, device=self.ids.device)
        try:
            return _last(self.pm(self.ids, input_pos=positions))
        except CaptureError as e:
            raise FxparError(
                f"pm.generate runs {type(self.pm._cache.skeleton).__name__}(tokens, input_pos=positions) against "
                "the model's key/value cache, and that call could not be captured; give the model its cache first "
                f"(model.setup_caches(max_batch_size, max_seq_len) in gpt-fast and fxpar.models.llama):\n{e}"
            ) from e

    def next(self, token: torch.Tensor) -> torch.Tensor:
        logits = _last(self.pm(token[:, None], input_pos=torch.tensor([self.at], device=token.device)))
        self.at += 1
        return logits


class _StaticCache:
    """Hugging Face's way: the model with a static cache of ``batch x max_len`` slots as buffers
    (``fxpar/static_cache.py``), run as another entry of the module sharing its parameters.
    Prompts are left-padded as ``attention_mask`` says: positions count real tokens only, and a
    slot is attended to once it holds one. So that later calls reuse the programs, prompts are
    padded further on the left to a multiple of ``PROMPT`` tokens, and the cache is made for a
    multiple of ``ROUND``."""

    PROMPT, ROUND = 16, 64

    def __init__(self, pm, input_ids, attention_mask, max_new_tokens: int):
        batch, given = input_ids.shape
        length = _round_up(given, self.PROMPT)
        max_len = _round_up(length + max_new_tokens, self.ROUND)
        by_rows = pm._microbatches > 1  # microbatches of the batch, each with its rows of the cache
        self.entry = f"generate[{batch}x{max_len}{' by rows' if by_rows else ''}]"
        programs = pm._cache
        if self.entry not in programs.entries:
            module, buffers = with_static_cache(programs.skeleton, batch, max_len, by_rows)
            programs.add_entry(self.entry, module, buffers)
        device = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device, torch.long)
        more = length - given
        input_ids = torch.cat([input_ids.new_zeros(batch, more), input_ids], dim=1)
        mask = torch.cat([mask.new_zeros(batch, more), mask], dim=1)
        self.pm, self.ids, self.at = pm, input_ids, length
        self.rows = torch.arange(batch, device=device)
        self.slots = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.slots[:, :length] = mask
        self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def _run(self, tokens, positions, start: int) -> torch.Tensor:
        start = torch.tensor(start, device=tokens.device)
        return self.pm._run(self.entry, (tokens, self.slots, positions, start, self.rows), {})[:, -1]

    def prompt(self) -> torch.Tensor:
        return self._run(self.ids, self.positions, 0)

    def next(self, token: torch.Tensor) -> torch.Tensor:
        self.slots[:, self.at] = 1
        self.positions = self.positions[:, -1:] + 1
        logits = self._run(token[:, None], self.positions, self.at)
        self.at += 1
        return logits


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _last(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1]


def _as_ids(ids, device) -> torch.Tensor | None:
    """The eos ids as a tensor; None for none (``[]`` turns a model's default off)."""
    if ids is None:
        return None
    ids = [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, device=device) if ids else None


def _explain(summaries: list, ranks: list[int]) -> str:
    return ("the ranks called pm.generate with different arguments:\n  " + "\n  ".join(differences(summaries, ranks))
            + "\nEvery rank must call pm.generate alike (the same prompts' shapes and the same options)")


def _check(input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise FxparError(f"pm.generate takes input_ids of shape (batch, prompt length) of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if max_new_tokens < 1:
        raise FxparError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise FxparError(f"temperature must be positive when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise FxparError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise FxparError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
