"""Run every rank of a plan in this one process, one thread per rank, with real collective
semantics; put sharded values back together; find the first node where a plan diverges.
"""

from __future__ import annotations

import threading

import torch
from torch.fx import GraphModule, Interpreter
from torch.utils import _pytree as pytree

from .errors import FxparError
from .geometry import join
from .mesh import DIM_ORDER, Mesh
from .placement import PARTIAL, Shard
from .runtime.comm import ThreadComm, ThreadWorld
from .runtime.p2p import ThreadP2P
from .ops.context import RankContext, RNGStreams, context_streams, running, stream_seeds



def rank_contexts(world: int, seed: int, exact: bool, timeout: float = 120.0) -> list[RankContext]:
    """Contexts for ``world`` simulated tensor-parallel ranks (see ``mesh_contexts``)."""
    return mesh_contexts(Mesh(tp=world), seed, exact, timeout)[0]


def mesh_contexts(mesh, seed: int, exact: bool, timeout: float = 120.0) -> tuple[list[RankContext], ThreadP2P]:
    """A context for every rank of ``mesh`` (communicators for each of its groups) and the
    mailboxes pipeline stages send through. Every rank's replicated random stream starts from
    torch's default generator, as the single-device run would."""
    worlds: dict = {}
    state = torch.default_generator.get_state()
    contexts = []
    for r in range(mesh.size):
        coord = mesh.coordinate(r)
        comms = {}
        for dim in DIM_ORDER:
            key = (dim,) + tuple(v for k, v in coord.items() if k != dim)
            if key not in worlds:
                worlds[key] = ThreadWorld(getattr(mesh, dim), timeout)
            comms[dim] = ThreadComm(worlds[key], coord[dim])
        # the replicas of a dense weight under expert parallelism, dp-major (zero splits over them)
        key = ("dp_ep",) + tuple(v for k, v in coord.items() if k not in ("dp", "ep"))
        if key not in worlds:
            worlds[key] = ThreadWorld(mesh.dp * mesh.ep, timeout)
        comms["dp_ep"] = ThreadComm(worlds[key], coord["dp"] * mesh.ep + coord["ep"])
        rep_seed, tp_seed = stream_seeds(seed, coord["tp"], coord["pp"])
        rep = torch.Generator()
        if mesh.pp == 1:  # one stage: the single-device model's stream, so exact mode can match it
            rep.set_state(state)
        else:
            rep.manual_seed(rep_seed)
        shard_gen = torch.Generator().manual_seed(tp_seed)
        rng = RNGStreams(rep, shard_gen, exact, mirrors_default=mesh.pp == 1)
        if mesh.cp > 1:
            rng.context, rng.context_sharded = context_streams(seed, coord["tp"], coord["pp"], coord["cp"])
        contexts.append(RankContext(rank=coord["tp"], comms=comms, rng=rng))
    return contexts, ThreadP2P(timeout)


def run_ranks(fn, contexts: list[RankContext], p2p: "ThreadP2P | None" = None) -> list:
    """``fn(rank)`` on one thread per rank, each inside its context; re-raises the first failure."""
    world = len(contexts)
    results: list = [None] * world
    errors: list = [None] * world

    def body(r):
        try:
            with running(contexts[r]):
                results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - reported after all threads stop
            errors[r] = e
            for comm in contexts[r].comms.values():
                comm.shared.abort()
            if p2p is not None:
                p2p.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"fxpar-rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = _first_real_error(errors)
    if first is not None:
        r, e = first
        raise FxparError(f"simulated rank {r} failed: {type(e).__name__}: {e}") from e
    # the replicated stream advanced as the single-device one would have: continue from it
    if contexts[0].rng.mirrors_default:
        torch.default_generator.set_state(contexts[0].rng.replicated.get_state())
    return results


def _first_real_error(errors):
    from .errors import CollectiveError

    real = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, CollectiveError)]
    anyerr = [(r, e) for r, e in enumerate(errors) if e is not None]
    return (real or anyerr or [None])[0]


def assemble(parts: list[torch.Tensor], placement, grad: bool = False) -> torch.Tensor:
    """The global value from every rank's local value. For gradients (``grad=True``) the
    gradient of a partial sum is the whole gradient (the same on every rank), and the gradients of
    an element several ranks hold add up."""
    if isinstance(placement, Shard) and grad:
        shape = list(parts[0].shape)
        shape[placement.dim] = placement.size
        out = parts[0].new_zeros(shape)
        for r, part in enumerate(parts):
            out.index_add_(placement.dim, torch.as_tensor(placement.indices(r), device=part.device), part)
        return out
    if placement is PARTIAL and not grad:
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p
        return out
    return join(parts, placement)


class Recorder(Interpreter):
    """Runs a graph and keeps every node's value (detached) by node name; with ``grads=True``
    also keeps the tensors that can carry a gradient, so their ``.grad`` can be read after
    backward (``gradients()``)."""

    def __init__(self, gm: GraphModule, grads: bool = False):
        super().__init__(gm)
        self.values: dict[str, object] = {}
        self.grads = grads
        self.live: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = _detach(out)
        if self.grads and isinstance(out, torch.Tensor) and out.requires_grad:
            out.retain_grad()
            self.live[n.name] = out
        return out

    def run_model(self, *args, **kwargs):
        """Run and return the output in the model's own structure (``ModelOutput``, tuples...)."""
        flat = self.run(*args, **kwargs)
        spec = getattr(self.module, "_out_spec", None)
        if spec is None:
            return flat
        return pytree.tree_unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat], spec)

    def gradients(self) -> dict[str, torch.Tensor]:
        return {k: t.grad for k, t in self.live.items() if t.grad is not None}


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x
