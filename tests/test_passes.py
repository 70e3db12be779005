"""Each pass: its structural effect on a small graph, then that the program still computes the
same function."""

import textwrap

import torch

import fxpar
from fxpar.capture import capture
from fxpar.metadata import COMM, INPUTS, LOCAL, ORIGIN, PLACEMENT, REQUIRES_GRAD
from fxpar.pipeline import PIPELINE, run_pipeline
from fxpar.plan_context import PlanContext
from fxpar.models import gpt, mlp
from tests.zoo import assert_close

aten = torch.ops.aten


def planned(model, args, tp=2, upto=None):
    cap = capture(model, args)
    ctx = PlanContext(fxpar.Mesh(tp=tp))
    passes = PIPELINE if upto is None else PIPELINE[: [p.__name__ for p in PIPELINE].index(upto) + 1]
    return run_pipeline(cap.gm, ctx, passes), ctx


def small_mlp():
    torch.manual_seed(0)
    return mlp.build(n_blocks=1, d_in=8, d_model=16, d_hidden=32, d_out=4)[0], (torch.randn(4, 8),)


def test_annotate_tensors_marks_what_can_carry_a_gradient():
    model, (idx,) = gpt.build()
    gm, _ = planned(model, (idx,), upto="annotate_tensors")
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["lm_head_weight"].meta[REQUIRES_GRAD]
    assert not nodes["idx"].meta[REQUIRES_GRAD]  # token ids
    assert not nodes["arange"].meta[REQUIRES_GRAD]  # positions
    assert nodes["embedding"].meta[REQUIRES_GRAD]


def test_insert_collectives_makes_every_placement_change_explicit():
    model, args = small_mlp()
    gm, _ = planned(model, args, upto="insert_collectives")
    kinds = [n.meta[COMM].kind for n in gm.graph.nodes if COMM in n.meta]
    assert kinds == ["copy_to_tp", "to_partial", "all_reduce", "copy_to_tp", "all_gather"]
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            want = node.meta.get(INPUTS, {}).get(inp.name)
            if want is not None:  # after the pass every edge already has the wanted placement
                assert inp.meta[PLACEMENT] == want, (inp.name, node.name)
        assert (node.meta[ORIGIN] is None) == (COMM in node.meta)


def test_localize_shapes_rewrites_literal_head_counts_per_rank():
    model, (idx,) = gpt.build()
    gm, _ = planned(model, (idx,), upto="localize_shapes")
    views = [n for n in gm.graph.nodes if n.target == aten.view.default and LOCAL in n.meta]
    assert views[0].args[1] == [2, 16, 4, 16]  # the global graph keeps what the model wrote
    assert [views[0].meta[LOCAL][r].args[1] for r in range(2)] == [[2, 16, 2, 16]] * 2
    split = next(n for n in gm.graph.nodes if n.target == aten.split.Tensor)
    assert split.meta[LOCAL][1].target == aten.split_with_sizes.default
    assert split.meta[LOCAL][1].args[1] == [32, 32, 32]
    emb = next(n for n in gm.graph.nodes if n.target == aten.embedding.default and LOCAL in n.meta)
    assert [emb.meta[LOCAL][r].args[2:4] for r in range(2)] == [(0, 128), (128, 256)]


def test_assign_rng_picks_the_stream_from_the_placement():
    model, (idx,) = gpt.build(dropout=0.1, flash=False)
    gm, _ = planned(model, (idx,), upto="assign_rng")
    streams = [(n.meta[PLACEMENT].__class__.__name__, n.meta["fxpar_rng"]) for n in gm.graph.nodes if "fxpar_rng" in n.meta]
    assert ("Replicate", "replicated") in streams and ("Shard", "sharded") in streams
    assert all((p == "Shard") == (s == "sharded") for p, s in streams)


GOLDEN_RANK1 = """
# model (MLP): replicated inp, column-parallel head
linear = aten.linear(x, self.inp.weight, self.inp.bias)  # R (4, 16)
# blocks.0 (Block): column-parallel fc1, row-parallel fc2
blocks_0 = self.blocks[0]
layer_norm = aten.layer_norm(linear, [16], blocks_0.norm.weight, blocks_0.norm.bias, cudnn_enable=False)
copy_to_tp = fxpar.copy_to_tp(layer_norm, group="tp")  # R (4, 16); sends 0 B fwd, 256 B bwd
linear_1 = aten.linear(copy_to_tp, blocks_0.fc1.weight, blocks_0.fc1.bias)  # S(1) (4, 16)
gelu = aten.gelu(linear_1)  # S(1) (4, 16)
to_partial = fxpar.to_partial(blocks_0.fc2.bias, group="tp")  # P (16); sends 0 B fwd, 0 B bwd
linear_2 = aten.linear(gelu, blocks_0.fc2.weight, to_partial)  # P (4, 16)
all_reduce = fxpar.all_reduce(linear_2, group="tp")  # R (4, 16); sends 256 B fwd, 0 B bwd
add = aten.add(linear, all_reduce)  # R (4, 16)
copy_to_tp_1 = fxpar.copy_to_tp(add, group="tp")  # R (4, 16); sends 0 B fwd, 256 B bwd
# model
linear_3 = aten.linear(copy_to_tp_1, self.head.weight, self.head.bias)  # S(1) (4, 2)
all_gather = fxpar.all_gather(linear_3, dim=1, size=4, group="tp")  # R (4, 4); sends 32 B fwd, 0 B bwd
return (all_gather,)
"""


def test_golden_rank_code_of_a_one_block_mlp():
    """The whole rewrite of a small MLP, as rank 1 runs it: the first linear stays whole (a
    layer_norm reads it), fc1/fc2 are the column/row pair with one all-reduce, the head is split
    by columns and gathered for the output."""
    model, args = small_mlp()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    lines = [line.strip() for line in plan.rank_code(1).splitlines()[4:]]
    # the code, the module headers, the notes: not the source lines (paths) or the blank lines
    body = [line for line in lines if line and not line.startswith(("# mlp.py", "# R", "def "))]
    assert body == textwrap.dedent(GOLDEN_RANK1).strip().splitlines()
    assert_close(plan.simulate(*args), model(*args), "golden plan output")
