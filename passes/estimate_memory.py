"""Pass (analysis): what each node costs in memory on one rank.

Reads the planned graph (placements, per-rank calls) and writes ``fxpar_memory``
(``fxpar.memory.NodeMemory``) on every node. Nothing is guessed: rank 0's program is run once on
fake tensors, op by op, under ``torch.autograd.graph.saved_tensors_hooks``, with parameters that
require grad where the model's do. Every tensor autograd keeps is looked up by its storage: a
storage some node produced is a reference to that node's output (counted once per stage however
many ops keep it), any other is new memory of the op that kept it (a dropout mask, softmax's
output, the copy a matmul makes of a transposed operand). Parameters are counted as parameters,
never as activations. With symbolic batch/sequence sizes the fake tensors carry the same symbols,
so every size is a sympy expression in them.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.node import map_aggregate
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from fxpar.codegen import get_path, rank_graph
from fxpar.holder import retarget_submodules
from fxpar.memory import NodeMemory, expr
from fxpar.metadata import MEMORY
from fxpar.placement import REPLICATE, Shard
from fxpar.plan_context import PlanContext
from fxpar.runtime.comm import Communicator
from fxpar.runtime.context import RankContext, running


class _FakeComm(Communicator):
    """Collectives of the right shapes on fake tensors (nothing is sent, nothing is counted)."""

    def __init__(self, world: int):
        super().__init__()
        self.rank, self.world = 0, world

    def all_reduce(self, t):
        return t.clone()

    def all_reduce_max(self, t):
        return t.clone()

    def all_gather(self, t):
        return [t.clone() for _ in range(self.world)]

    def reduce_scatter(self, t, dim):
        return t.chunk(self.world, dim)[0].clone()


def _fake_mode(gm: GraphModule):
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    raise ValueError("the graph carries no fake tensors to estimate with")


def _bytes(t: torch.Tensor):
    return expr(t.untyped_storage().nbytes())


def estimate_memory(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    # fake tensors of the device the program will run on, so that ops choose the kernels they will
    # really use (attention keeps q, k, v, its output and log-sum-exp with the fused CPU/CUDA
    # kernels; the meta device would take the unfused path and keep the attention matrix)
    device = torch.device(ctx.device_type)
    graph = rank_graph(gm, 0, device)
    global_nodes = {n.name: n for n in gm.graph.nodes}
    bodies = retarget_submodules(gm, device)  # higher-order ops' bodies, captured on meta
    env: dict = {}
    owner: dict = {}  # storage -> name of the node that made it
    params: set[str] = set()
    with _fake_mode(gm), running(RankContext(rank=0, comms={"tp": _FakeComm(ctx.tp)})):
        for node in graph.nodes:
            g = global_nodes.get(node.name)
            if node.op == "output":
                continue
            saved: list[torch.Tensor] = []
            info = {}
            if node.op == "placeholder":
                out = node.meta["val"]
                if isinstance(out, torch.Tensor):
                    out = torch.empty(out.shape, dtype=out.dtype, device=device)
            elif node.op == "get_attr":
                obj = get_path(gm, node.target)
                if isinstance(obj, torch.Tensor):
                    place = ctx.param_placements.get(node.target, REPLICATE)
                    shape = list(obj.shape)
                    if isinstance(place, Shard):
                        shape[place.dim] = place.local_size
                    trainable = isinstance(obj, torch.nn.Parameter) and obj.requires_grad
                    out = torch.empty(shape, dtype=obj.dtype, device=device).requires_grad_(trainable)
                    key = "param_bytes" if isinstance(obj, torch.nn.Parameter) else "buffer_bytes"
                    info = {key: expr(out.numel()) * out.element_size(), "trainable": trainable, "param_elem": out.element_size()}
                    params.add(node.name)
                else:
                    out = bodies.get(node.target, obj)
            else:
                args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, torch.fx.Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, torch.fx.Node) else a)
                fn = bodies.get(node.target) or get_path(gm, node.target) if node.op == "call_module" else node.target
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                    out = fn(*args, **kwargs)
            env[node] = out
            root, out_bytes, value_bytes = node.name, 0, 0
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    value_bytes += expr(t.numel()) * t.element_size()
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref in owner:
                        root = owner[ref]
                    else:
                        owner[ref] = node.name
                        out_bytes += _bytes(t) if node.op != "get_attr" else 0
            saved_new, roots, seen = 0, set(), set()
            for t in saved:
                ref = StorageWeakRef(t.untyped_storage())
                if ref in seen:
                    continue
                seen.add(ref)
                if ref in owner:
                    if owner[ref] not in params:
                        roots.add(owner[ref])
                else:
                    saved_new += _bytes(t)
            if g is not None:
                g.meta[MEMORY] = NodeMemory(
                    out_bytes=out_bytes,
                    value_bytes=value_bytes,
                    root=root,
                    saved_new=saved_new,
                    saved_roots=tuple(sorted(roots)),
                    **info,
                )
    return gm

