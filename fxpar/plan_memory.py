"""``Plan``'s memory queries: the estimate ``estimate_memory`` and ``cut_stages`` left in the plan's
context, evaluated at given sizes of the symbolic dimensions."""

from __future__ import annotations

from .errors import FxparError
from .memory import per_device
from .plan_context import PlanContext


def stage_memory(ctx: PlanContext, sizes: dict) -> list:
    """Per pipeline stage, the ``StageMemory`` one rank holds at ``sizes`` (default: the sizes
    the plan was made for)."""
    spec = ctx.pipeline
    values = {**spec.sizes, **sizes}
    return [s.memory.at(values, ctx.dim_names) for s in spec.stages]


def device_memory(ctx: PlanContext, sizes: dict) -> list:
    """Per pipeline rank, what it holds for all its stages at ``sizes``."""
    return per_device(stage_memory(ctx, sizes), [s.rank for s in ctx.pipeline.stages])


def max_cache(ctx: PlanContext, limit: float, sizes: dict) -> int:
    """The most positions a key/value cache (the buffers the program writes in place, along the
    dim it writes positions at) can hold, for the batch it was made for, with every device within
    ``limit`` bytes when generating: the weights and other buffers stay, the cache grows; nothing
    training keeps counts (gradients, optimizer state, activations saved for backward)."""
    most = None
    for m in device_memory(ctx, sizes):
        fixed = m.params + m.buffers - m.cache + m.gathered
        if not m.cache_per_position:
            if fixed > limit:
                return 0
            continue
        room = (limit - fixed) // m.cache_per_position
        most = room if most is None else min(most, room)
    if most is None:
        raise FxparError("the program writes no key/value cache (no buffer written in place at positions)")
    return max(0, int(most))


def max_microbatch(ctx: PlanContext, limit: float, dim: str, sizes: dict) -> int:
    """The largest size of the symbolic dimension ``dim`` at which every device fits ``limit``
    bytes (0 if none does): a doubling search, then a bisection."""
    if dim not in ctx.dim_names.values():
        raise FxparError(f"no symbolic dimension named {dim!r}: capture it with dynamic_shapes (named {dim!r})")
    fits = lambda b: max(m.peak for m in device_memory(ctx, {**sizes, dim: b})) <= limit  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
