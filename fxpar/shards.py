"""Each rank's parameters and buffers, made without ever holding the whole model.

Two sources:

* a model with real tensors: each rank copies its slice of each tensor (``shard_tensor``);
* a model on the meta device: each rank initializes only its slice from a seed
  (``init_tensor``). The values do not depend on the mesh: a tensor is generated in blocks of rows,
  each from its own generator seeded by (seed, name, block), and a rank generates only the blocks
  that hold its slice, so a 4-way and a 2-way split (and the single-device ``init_state_dict``)
  hold the same numbers. Matrices get N(0, 0.02); vectors used as a scale (norm weights) ones and
  vectors used as an offset (biases) zeros, read from how the graph uses them. Pass
  ``init_fn(name, shape, dtype, placement, rank)`` to make some tensors yourself (return ``None``
for the others), e.g. buffers such as rotary tables that a meta-device model holds no values for.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.fx import GraphModule, Node

from .errors import FxparError
from .placement import REPLICATE, Placement, Shard
from .rules import WEIGHT_TRANSPARENT

ROWS_PER_BLOCK = 64
INIT_STD = 0.02
aten = torch.ops.aten



def local_shape(shape, placement: Placement) -> list[int]:
    shape = list(shape)
    if isinstance(placement, Shard):
        shape[placement.dim] = placement.local_size
    return shape


def shard_tensor(full: torch.Tensor, placement: Placement, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` as a new contiguous tensor."""
    if not isinstance(placement, Shard):
        return full.detach().clone()
    runs = placement.runs[rank]
    parts = [full.detach().narrow(placement.dim, a, b - a) for a, b in runs]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, placement.dim)).clone().contiguous()


def param_roles(gm: GraphModule) -> dict[str, str]:
    """``"normal"``, ``"ones"`` or ``"zeros"`` for each parameter, from how the graph uses it."""
    roles: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if val.dim() >= 2:
            roles[node.target] = "normal"
            continue
        roles[node.target] = _vector_role(node)
    return roles


def _vector_role(node: Node) -> str:
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            t = user.target
            if t in WEIGHT_TRANSPARENT:
                frontier.append(user)
            elif t in (aten.layer_norm.default, aten.rms_norm.default, aten.group_norm.default):
                return "ones" if user.args.index(n) == 2 else "zeros"
            elif t in (aten.mul.Tensor, aten.div.Tensor):
                return "ones"
            elif t in (aten.linear.default, aten.addmm.default, aten.add.Tensor, aten.sub.Tensor, aten.baddbmm.default):
                return "zeros"
    return "zeros"


def _seed(seed: int, name: str, block: int) -> int:
    return zlib.crc32(f"{seed}:{name}:{block}".encode()) & 0x7FFFFFFF


def _selection(steps) -> dict:
    """Per dim, the global indices a rank holds after each ``(placement, rank)`` step in turn (a
    later step splits what the earlier ones left: tp inside one ep rank's experts)."""
    idx: dict = {}
    for place, r in steps:
        if isinstance(place, Shard):
            mine = np.asarray(place.indices(r))
            idx[place.dim] = idx[place.dim][mine] if place.dim in idx else mine
    return idx


def init_tensor(name, shape, dtype, placement: Placement, rank: int, seed: int, role: str, device="cpu", outer=None):
    """Rank ``rank``'s slice of tensor ``name``, generated from ``seed`` (see the module doc).
    ``outer``: a ``(placement, rank)`` split applied first, ``placement`` splitting its part."""
    shape = [int(s) for s in shape]
    idx = _selection([s for s in (outer, (placement, rank)) if s is not None])
    loc = [len(idx[d]) if d in idx else shape[d] for d in range(len(shape))]
    if role == "zeros":
        return torch.zeros(loc, dtype=dtype, device=device)
    if role == "ones":
        return torch.ones(loc, dtype=dtype, device=device)
    rows = shape[0]
    needed = torch.as_tensor(idx[0]) if 0 in idx else torch.arange(rows)
    # filled block by block: nothing bigger than one block of rows is allocated besides the output
    out = torch.empty(loc, dtype=dtype, device=device)
    for block in sorted({int(r) // ROWS_PER_BLOCK for r in needed}):
        lo = block * ROWS_PER_BLOCK
        n = min(ROWS_PER_BLOCK, rows - lo)
        g = torch.Generator().manual_seed(_seed(seed, name, block))
        data = torch.randn([n, *shape[1:]], generator=g, dtype=torch.float32) * INIT_STD
        where = torch.nonzero((needed >= lo) & (needed < lo + n)).flatten()  # local positions
        data = data.index_select(0, needed[where] - lo)
        for d in sorted(idx):
            if d > 0:
                data = data.index_select(d, torch.as_tensor(idx[d]))
        out.index_copy_(0, where.to(device), data.to(dtype=dtype, device=device))
    return out


def init_state_dict(gm: GraphModule, seed: int, names=None) -> dict[str, torch.Tensor]:
    """The whole tensors ``init_tensor`` draws from, for a single-device reference model.

    Allocates every tensor in full: for tests and small models only.
    """
    roles = param_roles(gm)
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in roles and (names is None or node.target in names):
            val = node.meta["val"]
            out[node.target] = init_tensor(node.target, val.shape, val.dtype, REPLICATE, 0, seed, roles[node.target])
    return out


def missing_buffer_error(names: list[str]) -> FxparError:
    return FxparError(
        f"buffers {names} are on the meta device and fxpar cannot compute their values; build the model "
        "under `with fxpar.empty_weights():` (parameters on the meta device, buffers made as usual) or pass "
        "init_fn=lambda name, shape, dtype, placement, rank: ... that returns them"
    )
