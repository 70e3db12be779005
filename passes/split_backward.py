"""Pass (analysis): which ops' weight gradients a zero-bubble schedule runs apart, as W.

Runs where the schedule splits backward (``schedule="zbh1"``, ``"zbv"``), after every pass that
adds or moves ops. Reads the stages of ``ctx.pipeline``, ``fxpar_recompute``, ``fxpar_memory``
and ``fxpar_requires_grad``. Writes ``fxpar_deferred`` on each chosen op (the flat positions of
its weight operands in ``(args, kwargs)``) and, per stage, ``StageMemory.deferred`` (the bytes W
keeps per microbatch) with ``deferred_in_flight`` (the most microbatches between B and W).

An op is chosen from the graph's data flow, never from names: a contraction (matmul, linear,
convolution, einsum of two operands) of an activation by a weight, where the weight is a
trainable parameter or a view of one and the op is linear in it. Its weight gradient (a second
GEMM as large as the forward) then reads only the activation and the output's gradient, never
the weight, so it can wait while B hands the input gradients on (``fxpar/ops/deferred.py``
runs it). A weight read through ``gather_params`` counts where its whole copy is kept between
steps (``precision``, zero 1: the gather's backward then runs once in B for the layer's other
weights and once per deferred op in W, summing or casting each part alike). Left in B: ops in a
recomputed region (their forward is remade inside backward), weights gathered for each use or
whose gradient is reduce-scattered at once (zero 2 and 3, offload: one collective per layer
would become one per op); small weight gradients (norms, biases of other ops) cost too little to
move. A plan where no op is left to defer is an error that says why.

W keeps, per microbatch, the storage of each chosen op's activation input and its output's
gradient (the size of its output); what else autograd kept of the microbatch is freed by B.

Which ops qualify is ``fxpar.weight_grads.deferrable``; ``fxpar.weight_grads.defer_weight_grads``
applies the marks to a rank's program, each marked op called through ``fxpar.ops.deferred.later``.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxpar import schedule as sched
from fxpar.errors import PlanError
from fxpar.memory import node_memory
from fxpar.metadata import DEFERRED, RECOMPUTE
from fxpar.plan_context import PlanContext
from fxpar.weight_grads import CONTRACTIONS, deferrable

def split_backward(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    spec = ctx.pipeline
    schedule = sched.make(ctx.options.schedule, ctx.mesh.pp, ctx.options.microbatches, ctx.options.virtual)
    pending = schedule.weight_pending()
    by_name = {n.name: n for n in gm.graph.nodes}
    through = gathers_kept(ctx)
    total = 0
    for s in spec.stages:
        nodes = [by_name[name] for name in s.nodes]
        for node in nodes:
            weights = deferrable(node, through)
            if weights is None:
                node.meta.pop(DEFERRED, None)
            else:
                node.meta[DEFERRED] = weights
                total += 1
        s.memory.deferred = deferred_bytes(nodes, by_name, marked=True)
        s.memory.deferred_in_flight = pending[s.index] if s.memory.deferred else 0
    if not total:
        raise PlanError(_why_none(gm, ctx))
    return gm


def deferred_keeps(node: Node, marked: bool = False) -> tuple[object, tuple[str, ...]]:
    """What W keeps of ``node`` if its weight gradient waits (``marked``: if it is marked, else
    if it could be): the bytes of its output's gradient, and the storages of its activation
    inputs (by root name)."""
    weights = node.meta.get(DEFERRED) if marked else deferrable(node, True)
    if weights is None:
        return 0, ()
    flat = pytree.tree_flatten((node.args, node.kwargs))[0]
    roots = tuple(node_memory(a).root or a.name for i, a in enumerate(flat) if isinstance(a, Node) and i not in weights)
    return node_memory(node).value_bytes, roots


def deferred_bytes(nodes: list[Node], by_name: dict, marked: bool = False):
    """What one microbatch of a stage made of ``nodes`` keeps between B and W: each deferred op's
    output gradient, and each activation storage they read once."""
    kept, roots = 0, set()
    for node in nodes:
        out, reads = deferred_keeps(node, marked)
        kept += out
        for r in reads:
            if r not in roots and r in by_name:
                roots.add(r)
                kept += node_memory(by_name[r]).out_bytes
    return kept


def gathers_kept(ctx: PlanContext) -> bool:
    """Whether weights read through ``gather_params`` keep their whole copy between steps and
    take their gradient in parts (zero 0 or 1, nothing offloaded)."""
    return ctx.options.zero <= 1 and ctx.options.offload is None


def _why_none(gm: GraphModule, ctx: PlanContext) -> str:
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONTRACTIONS]
    recomputed = sum(1 for n in matmuls if RECOMPUTE in n.meta)
    gathered = sum(1 for n in matmuls if RECOMPUTE not in n.meta and deferrable(n, True) and not deferrable(n, False))
    reasons, fixes = [], []
    if recomputed:
        reasons.append(f"{recomputed} are in regions backward recomputes (recompute={ctx.options.recompute!r})")
        fixes.append("recompute='selective' or 'none'")
    if gathered:
        reasons.append(f"{gathered} read weights whose gradients zero={ctx.options.zero} (offload="
                       f"{ctx.options.offload!r}) reduces a layer at a time")
        fixes.append("zero=1 without offload")
    why = "; ".join(reasons) or "none reads a trainable parameter"
    return (f"schedule={ctx.options.schedule!r} runs the weight gradients of matmuls apart from the rest of backward, "
            f"but none of the {len(matmuls)} matmuls here can wait: {why}. Use schedule='1f1b' (the same "
            f"activations) or 'interleaved'{', or ' + ' and '.join(fixes) if fixes else ''}")


