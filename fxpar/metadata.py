"""The one schema of ``node.meta`` keys that fxpar reads and writes.

Standard keys from ``torch.export`` are reused as they are:

==================  ===========================================  ==================================
key                 type                                         example
==================  ===========================================  ==================================
``val``             ``FakeTensor`` / ``SymInt`` / tuple of them   ``FakeTensor(..., size=(2, 16, 64))``
``stack_trace``     ``str``                                      ``File "gpt.py", line 48, in forward``
``nn_module_stack`` ``dict[str, (path, class)]``                 ``{'...attn': ('h.0.attn', '...')}``
==================  ===========================================  ==================================

Keys fxpar adds (all prefixed ``fxpar_``); ``val`` always describes the *global* value:

``fxpar_placement`` : ``Placement | tuple[Placement | None, ...] | None``
    Layout of the node's output over the ``tp`` ranks (a tuple for ops returning several tensors,
    ``None`` for non-tensors). Written by ``plan_sharding``; ``sequence_parallel`` splits the values
    between tensor-parallel blocks along their token dim. Example: ``S(2)``.
``fxpar_inputs`` : ``dict[str, Placement]``
    The placement in which this node consumes each tensor input, keyed by the input node's name.
    Where it differs from the producer's ``fxpar_placement``, ``insert_collectives`` converts.
``fxpar_decision`` : ``fxpar.plan_context.Decision``
    For matmuls with a weight and for embeddings: ``.style`` ``"colwise"``, ``"rowwise"``,
    ``"vocab"`` or ``"replicate"``, and ``.why`` (its text ``"replicate: its output feeds layer_norm"``).
``fxpar_fallback`` : ``str``
    Set on nodes that had no sharding rule for sharded inputs and so gathered them.
``fxpar_requires_grad`` : ``bool``
    Whether the value can carry a gradient (depends on a parameter or a floating input).
``fxpar_comm`` : ``CommInfo``
    On collective nodes: kind, mesh dimension (``"tp"``; ``"cp"`` for the collectives of
    ``passes/context_parallel.py``, which stay on the nodes of the cp rank's program; ``"ep"``
    for the dispatch and combine of ``passes/expert_parallel.py``), elements and bytes each rank
    sends per call (for a cp collective on a tp-split value, the tp rank's part; for ep, at a
    balanced router's load, in the sizes known only at run time).
``fxpar_origin`` : ``str | None``
    Name of the captured node whose value this node computes (``None`` for inserted nodes); ties
    every per-rank node back to the single-device graph for divergence checks.
``fxpar_local`` : ``dict[int, LocalCall]``
    Per-rank replacement of target/args/kwargs, for ops whose arguments carry sizes
    (``view(x, [B, T, 4, 16])`` becomes ``view(x, [B, T, 2, 16])`` at tp=2). Written by
    ``localize_shapes``, applied by codegen.
``fxpar_rng`` : ``str``
    On dropout nodes: ``"replicated"`` (same mask on every rank) or ``"sharded"`` (each rank its
    own slice), with ``" (cp split)"`` where the input is split over cp (each cp rank its own
    masks); ``"context"`` on the cp rank's program, before ``assign_rng``.
``fxpar_memory`` : ``fxpar.memory.NodeMemory``
    What the node costs one rank: parameter bytes, the storage its output creates, what autograd
    keeps for backward (new tensors, references to other nodes' outputs), its forward FLOPs
    (``FlopCounterMode``: what recomputation and the step-time model price); sympy expressions
    with symbolic sizes. Written by ``estimate_memory``. Example:
    ``NodeMemory(out_bytes=8192, value_bytes=8192, root='linear', saved_new=0, saved_roots=('mul_1',))``.
``fxpar_grad_partial`` : ``bool``
    Set on replicated values whose gradient each rank holds only its part of, summed by a
    backward all-reduce further up (rows an expert picked, when the all-reduce moved to the
    tokens they were picked from). Written by ``insert_collectives``; ``Plan.check`` sums them.
``fxpar_recompute`` : ``str``
    The region a node belongs to whose activations backward recomputes instead of keeping
    (``"transformer.h.0"``, ``"transformer.h.0.attn core"``). Written by ``plan_recompute``.
``fxpar_deferred`` : ``tuple[int, ...]``
    On a matmul or convolution of an activation by a parameter whose weight gradient a
    zero-bubble schedule runs as W, after the input gradients (B): the flat positions of its
    weight operands in ``(args, kwargs)``. Written by ``split_backward``. Example: ``(1, 2)``
    for ``linear(x, weight, bias)``.
``fxpar_ring`` : ``str``
    On attention the context-parallel plan runs as ring attention: every cp rank's positions
    (``"0:4,12:16|4:8,8:12"``, the zigzag layout at cp=2 of 16). Written by ``split_sequence``;
    ``cp_rank_program`` makes the node call ``torch.ops.fxpar.ring_attention``.
``fxpar_stage`` : ``int``
    The pipeline stage a compute node runs in (nodes every stage recomputes have none). Written by
    ``cut_stages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import Node

from .placement import Placement

PLACEMENT = "fxpar_placement"
INPUTS = "fxpar_inputs"
DECISION = "fxpar_decision"
FALLBACK = "fxpar_fallback"
REQUIRES_GRAD = "fxpar_requires_grad"
COMM = "fxpar_comm"
ORIGIN = "fxpar_origin"
LOCAL = "fxpar_local"
RNG = "fxpar_rng"
MEMORY = "fxpar_memory"
STAGE = "fxpar_stage"
RECOMPUTE = "fxpar_recompute"
GRAD_PARTIAL = "fxpar_grad_partial"
DEFERRED = "fxpar_deferred"
RING = "fxpar_ring"


@dataclass(frozen=True)
class CommInfo:
    """What a collective node moves: ``kind`` is all_reduce, all_gather, gather_to_tp (all-gather
    forward, reduce-scatter backward), reduce_scatter, all_to_all (between even splits of two
    dims), redistribute, copy_to_tp (all-reduce in backward only), to_partial, shard_to_partial,
    pick_local (no communication), shard (a local slice whose backward all-gathers),
    sum_duplicates (after a weight whose rows several ranks share: an all-reduce of those rows'
    gradients in backward) or ring (ring attention: key/value blocks passed around the cp
    ranks, ``fxpar/ops/ring.py``). ``elements`` is the number of elements of the global tensor;
    ``bytes`` is what one rank sends in forward with a ring algorithm; ``bwd_bytes`` what it sends
    in backward."""

    kind: str
    group: str
    elements: int
    bytes: int
    bwd_bytes: int
    src: str
    dst: str


@dataclass(frozen=True)
class LocalCall:
    """A node's call on one rank: replaces ``target``, ``args`` and ``kwargs`` in that rank's graph."""

    target: Callable | Any
    args: tuple
    kwargs: dict


def out_placement(node: Node, index: int | None = None) -> Placement | None:
    """Placement of a node's output, or of its ``index``-th output for multi-output nodes."""
    p = node.meta.get(PLACEMENT)
    if isinstance(p, tuple):
        return p[index] if index is not None else None
    return p


def splits_output(node: Node) -> bool:
    """Whether the node's output (any of its outputs) is sharded or a partial sum."""
    p = node.meta.get(PLACEMENT)
    return any(x is not None and (x.is_shard() or x.is_partial()) for x in (p if isinstance(p, tuple) else (p,)))


def copy_meta(src: Node, dst: Node, **updates) -> None:
    """Give a node created by a pass the metadata of the node it replaces or serves."""
    for key in ("stack_trace", "nn_module_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    dst.meta.update(updates)


def replace_uses(old: Node, new: Node) -> None:
    """Point every user of ``old`` at ``new``, keeping ``fxpar_inputs`` keyed by the new name."""
    old.replace_all_uses_with(new)
    for user in new.users:
        reqs = user.meta.get(INPUTS)
        if reqs and old.name in reqs:
            reqs = dict(reqs)
            reqs[new.name] = reqs.pop(old.name)
            user.meta[INPUTS] = reqs
