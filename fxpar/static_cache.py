"""A Hugging Face model run against a static key/value cache that is part of the module.

Hugging Face models take their cache as an argument (``cache=`` in transformers 5,
``past_key_values=`` before), an object export cannot take as an input, and whose tensors would be
inputs (whole on every rank) if it could. Here the cache's tensors are buffers of the module
instead, as in Hugging Face's own ``TorchExportableModuleWithStaticCache``, so that the planner
places them like the keys and values written into them (a rank holds its own key/value heads) and
the programs fill them in place. Unlike that wrapper, the module keeps the model's parameter names
(it shares the model's submodules), so its programs run on the shards the model's own programs
made, and it takes an attention mask, so that prompts of different lengths run left-padded in one
batch as Hugging Face's ``generate`` runs them.

``forward(input_ids, attention_mask, position_ids, start, rows)`` runs the tokens at
``position_ids`` (rotary positions, which padding shifts) in cache slots ``start, start + 1, ...``,
attending to the slots ``attention_mask`` (``(batch, max_len)``: 1 where a slot holds a real
token) allows up to their own; it returns the logits. With ``by_rows``, the sequences given are
the cache's rows ``rows`` (a microbatch of the batch the cache holds: a pipeline keeps several
in flight, each reading and writing its own rows); otherwise they are all of its rows.
"""

from __future__ import annotations

import copy
import inspect
import types

import torch
import torch.nn as nn

from .errors import FxparError


def cache_argument(model: nn.Module) -> str | None:
    """The keyword a model's forward takes a Hugging Face cache object by, if any."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def with_static_cache(model: nn.Module, batch_size: int, max_len: int,
                      by_rows: bool = False) -> tuple[nn.Module, list[str]]:
    """``model`` (a Hugging Face causal LM, on any device: nothing is allocated on the meta
    device) with a static cache for ``batch_size`` sequences of ``max_len`` slots, and the names
    of the cache's buffers (``fxpar_cache_4x128_keys_0``, ...: caches of other sizes are other
    buffers). The model itself is not changed."""
    try:
        from transformers.cache_utils import StaticCache, StaticLayer
    except ImportError as e:  # pragma: no cover - only Hugging Face models get here
        raise FxparError("generation with a Hugging Face model's cache needs transformers installed") from e
    argument = cache_argument(model)
    config = getattr(model, "config", None)
    if argument is None or config is None:
        raise FxparError(f"{type(model).__name__} takes no Hugging Face cache (no `cache` or `past_key_values` "
                         "argument, or no config)")
    cache = StaticCache(config=config, max_cache_len=max_len)
    # sliding-window layers branch on how full they are, which a static graph cannot: every layer
    # keeps all max_len slots (exact; only memory is spent), as Hugging Face's export wrapper does
    rows_layer = _rows_layer(StaticLayer) if by_rows else None
    cache.layers = [rows_layer(max_len) if by_rows else layer if type(layer) is StaticLayer else StaticLayer(max_len)
                    for layer in cache.layers]
    weight = next(model.parameters())
    heads, head_dim = _head_shapes(config)
    cache.early_initialization(batch_size, heads, head_dim, weight.dtype, weight.device)
    wrapper = copy.copy(model)  # the model's submodules and parameters, under their names
    wrapper._buffers = dict(model._buffers)  # the cache's buffers are the wrapper's alone
    wrapper._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    prefix = f"fxpar_cache_{batch_size}x{max_len}" + ("_rows" if by_rows else "")
    names = []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if by_rows:  # (batch, heads, max_len, dim) -> (batch x max_len, heads, dim): slots
            keys, values = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1]) for t in (keys, values))
        for kind, tensor in (("keys", keys), ("values", values), ("length", layer.cumulative_length)):
            name = f"{prefix}_{kind}_{i}"
            wrapper.register_buffer(name, tensor, persistent=False)
            names.append(name)
    forward = type(model).forward

    def cached_forward(self, input_ids, attention_mask, position_ids, start, rows):
        for i, layer in enumerate(cache.layers):
            # the layer's tensors are this module's buffers (a copy of the module has its own)
            layer.keys = getattr(self, f"{prefix}_keys_{i}")
            layer.values = getattr(self, f"{prefix}_values_{i}")
            layer.cumulative_length = getattr(self, f"{prefix}_length_{i}")
            layer.cumulative_length.copy_(start)
            layer.rows = rows
        out = forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{argument: cache})
        return out.logits if hasattr(out, "logits") else out[0]

    wrapper.forward = types.MethodType(cached_forward, wrapper)
    return wrapper, names


def _rows_layer(static_layer):
    """A static cache layer whose tensors hold ``(batch x max_len)`` slots of key/value heads, of
    which it writes and reads the rows ``self.rows`` only: the new keys and values go into their
    slots first (one ``index_copy_`` along the slots, so that the cache takes the heads' layout
    from them), then those rows are read back for attention. Microbatches of one batch share the
    cache so."""

    class RowsLayer(static_layer):
        def update(self, key_states, value_states, *args, **kwargs):
            batch, heads, length, _ = key_states.shape
            positions = torch.arange(length, device=key_states.device) + self.cumulative_length
            self.cumulative_length.add_(length)
            slots = (self.rows[:, None] * self.max_cache_len + positions[None, :]).reshape(-1)
            out = []
            for cache, new in ((self.keys, key_states), (self.values, value_states)):
                cache.index_copy_(0, slots, new.transpose(1, 2).reshape(batch * length, heads, new.shape[-1]))
                rows = cache.view(-1, self.max_cache_len, heads, new.shape[-1]).index_select(0, self.rows)
                out.append(rows.transpose(1, 2))
            return tuple(out)

    return RowsLayer


def _head_shapes(config) -> tuple[int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return heads, head_dim
