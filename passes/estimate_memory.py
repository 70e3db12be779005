"""Pass (analysis): what each node costs in memory on one rank.

Reads the planned graph (placements, per-rank calls) and writes ``fxpar_memory``
(``fxpar.memory.NodeMemory``) on every node. Nothing is guessed: rank 0's program is run once on
fake tensors, op by op, under ``torch.autograd.graph.saved_tensors_hooks``, with parameters that
require grad where the model's do. Every tensor autograd keeps is looked up by its storage: a
storage some node produced is a reference to that node's output (counted once per stage however
many ops keep it), any other is new memory of the op that kept it (a dropout mask, softmax's
output, the copy a matmul makes of a transposed operand). Parameters are counted as parameters,
never as activations. Each op's FLOPs are counted as it runs (``FlopCounterMode``), for
recomputation's choices and the step-time model (``fxpar/cost.py``). With symbolic batch/sequence
sizes the fake tensors carry the same symbols, so every size is a sympy expression in them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator

import torch
from torch.fx import GraphModule
from torch.fx.node import map_aggregate
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from fxpar.blocks import copies
from fxpar.codegen import get_path, rank_graph
from fxpar.fake_values import fake_mode
from fxpar.holder import retarget_submodules
from fxpar.memory import NodeMemory, expr
from fxpar.metadata import MEMORY
from fxpar.placement import REPLICATE, Shard
from fxpar.plan_context import PlanContext
from fxpar.ops.comm import shape_comms
from fxpar.ops.context import RankContext, running


if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in flop_registry:
    # torch counts the CUDA attention kernels only; the CPU one does the same matmuls
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def _no_flops(target) -> bool:
    """Ops that cannot run a matmul: views, pointwise ops and getitem (counting is skipped, the
    counter's dispatch costing more than they do)."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.is_view or torch.Tag.pointwise in target.tags


def _bytes(t: torch.Tensor):
    return expr(t.untyped_storage().nbytes())


def estimate_memory(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    # fake tensors of the device the program will run on, so that ops choose the kernels they will
    # really use (attention keeps q, k, v, its output and log-sum-exp with the fused CPU/CUDA
    # kernels; the meta device would take the unfused path and keep the attention matrix)
    device = torch.device(ctx.options.device_type)
    graph = rank_graph(gm, 0, device)
    global_nodes = {n.name: n for n in gm.graph.nodes}
    bodies = retarget_submodules(gm, device)  # higher-order ops' bodies, captured on meta
    env: dict = {}
    owner: dict = {}  # storage -> name of the node that made it
    params: set[str] = set()
    handed: dict = {}  # storages of multi-tensor outputs, owned by the getitem that takes each out
    renames: dict = {}  # fresh run-time size symbols of this fake run -> the captured graph's
    found: dict[str, NodeMemory] = {}
    repeats = _Repeats(graph, env, owner, found)
    with fake_mode(gm), running(RankContext(rank=0, comms=shape_comms(ctx.mesh))):
        for node in graph.nodes:
            g = global_nodes.get(node.name)
            if node.op == "output":
                continue
            copied = repeats.take(node)
            if copied is not None:
                if g is not None:
                    g.meta[MEMORY] = copied
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
                # FLOPs price recomputation and the step time (fxpar/cost.py)
                counting = not _no_flops(node.target)
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                        FlopCounterMode(display=False) if counting else contextlib.nullcontext() as flops:
                    out = fn(*args, **kwargs)
                info = {"flops": _renamed(expr(flops.get_total_flops()), renames) if counting else 0}
            env[node] = out
            if g is not None:
                _same_run_time_sizes(out, g.meta.get("val"), renames)
            root, out_bytes, value_bytes = node.name, 0, 0
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            kept_here = {StorageWeakRef(t.untyped_storage()) for t in saved}
            for t in leaves:
                value_bytes += expr(t.numel()) * t.element_size()
                ref = StorageWeakRef(t.untyped_storage())
                if ref in handed and node.target is operator.getitem:
                    # a tensor of a tuple of separate tensors belongs to the getitem taking it out,
                    # so that a later op keeping it keeps it alone, not the whole tuple
                    del handed[ref]
                    owner[ref] = node.name
                    out_bytes += _bytes(t)
                elif ref in owner:
                    root = owner[ref]
                else:
                    owner[ref] = node.name
                    if len(leaves) > 1 and ref not in kept_here and node.op == "call_function":
                        handed[ref] = node.name
                    else:
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
            found[node.name] = NodeMemory(
                out_bytes=_renamed(out_bytes, renames),
                value_bytes=_renamed(value_bytes, renames),
                root=root,
                saved_new=_renamed(saved_new, renames),
                saved_roots=tuple(sorted(roots)),
                **info,
            )
            if g is not None:
                g.meta[MEMORY] = found[node.name]
    return gm


class _Repeats:
    """The results of a repeated block's ops taken from the block it repeats (``blocks.copies``),
    renamed to its own nodes, instead of run again on fake tensors: a 70B model's 80 layers cost
    one layer's run. A copy is taken only where that is exact: the template ran before it, every
    storage the template's results name is its own or one of its inputs', and what it hands on to
    ops outside is tensors of storages of their own (the copy hands on fresh ones, alike)."""

    def __init__(self, graph, env: dict, owner: dict, found: dict):
        self.env, self.owner, self.found = env, owner, found
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.pending = {c.nodes[0]: c for c in copies(graph)}
        self.taken: dict = {}  # node of a copy -> (template node, template's names -> the copy's, the copy's nodes)

    def take(self, node) -> NodeMemory | None:
        """``node``'s results if it is part of a copy that can be taken, else None (run it)."""
        copy = self.pending.pop(node, None)
        if copy is not None:
            names = self._names(copy)
            if names is not None:
                members = set(copy.nodes)
                self.taken.update((n, (t, names, members)) for t, n in zip(copy.template, copy.nodes))
        if node not in self.taken:
            return None
        template, names, members = self.taken.pop(node)
        info = self.found[template.name]
        if any(u not in members for u in node.users):
            self._hand_on(template, node)
        return dataclasses.replace(info, root=names[info.root],
                                   saved_roots=tuple(sorted(names[r] for r in info.saved_roots)))

    def _names(self, copy):
        """Names of the template's nodes and of the storages its results name -> the copy's; None
        where the copy cannot be taken."""
        if self.order[copy.template[-1]] > self.order[copy.nodes[0]] or any(
                self.order[i] > self.order[copy.nodes[0]] for i in copy.inputs.values()):
            return None
        if any(t.name not in self.found for t in copy.template):
            return None
        names = {t.name: n.name for t, n in zip(copy.template, copy.nodes)}
        storages: dict = {}
        for a, b in copy.inputs.items():
            names[a.name] = b.name
            xs, ys = pytree.tree_leaves(self.env.get(a)), pytree.tree_leaves(self.env.get(b))
            if len(xs) != len(ys):
                return None
            for x, y in zip(xs, ys):
                if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                    if x is not y and str(x) != str(y):  # a size (symbolic ones by their expression)
                        return None
                    continue
                # this rank's inputs: a weight placed otherwise than the template's is no copy
                if (x.shape, x.stride(), x.dtype, x.requires_grad) != (y.shape, y.stride(), y.dtype, y.requires_grad):
                    return None
                rx = self.owner.get(StorageWeakRef(x.untyped_storage()))
                ry = self.owner.get(StorageWeakRef(y.untyped_storage()))
                if storages.setdefault(rx, ry) != ry:
                    return None
        if len(set(storages.values())) != len(storages):  # inputs that share storage share it alike
            return None
        names.update((rx, ry) for rx, ry in storages.items() if rx is not None)
        inside = set(copy.template)
        for t in copy.template:
            info = self.found[t.name]
            if any(r not in names for r in (info.root, *info.saved_roots)):
                return None
            handed = any(u not in inside for u in t.users)
            if handed and not (isinstance(self.env.get(t), torch.Tensor) and info.root == t.name):
                return None
        return names

    def _hand_on(self, template, node) -> None:
        """A fresh tensor like the template's output, of a storage of its own, for ops outside."""
        t = self.env[template]
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if t.requires_grad:
            out = out.requires_grad_().clone()  # not a leaf, as the template's was not
        self.env[node] = out
        self.owner[StorageWeakRef(out.untyped_storage())] = node.name



def _same_run_time_sizes(local, global_val, renames: dict) -> None:
    """Sizes known only at run time (``u0``, the tokens one expert gets) are made afresh by every
    fake run of the op that makes them; name them as the captured graph does."""
    pairs = zip(pytree.tree_leaves(local), pytree.tree_leaves(global_val))
    for a, b in pairs:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()):
            continue
        for x, y in zip(a.shape, b.shape):
            if isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt):
                ex, ey = x.node.expr, y.node.expr
                if ex.is_Symbol and ey.is_Symbol and ex != ey and str(ex).startswith("u"):
                    renames[ex] = ey


def _renamed(e, renames: dict):
    return e.subs(renames) if renames and hasattr(e, "subs") else e
