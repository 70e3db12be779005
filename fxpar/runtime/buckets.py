"""Gradients reduced in buckets: one collective per ~25 MiB of one dtype (DDP's default) instead
of one per tensor, for data-parallel all-reduces and zero 1's reduce-scatters at a step's end."""

from __future__ import annotations

BUCKET_BYTES = 25 << 20


def buckets(items: list, tensor=lambda x: x):
    """``items`` in order, in runs of at most ``BUCKET_BYTES`` (at least one item each) whose
    tensors (``tensor(item)``) share a dtype."""
    bucket, size = [], 0
    for item in items:
        t = tensor(item)
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != tensor(bucket[0]).dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket
