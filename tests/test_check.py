"""``Plan.check`` compares every value with the single-device model and names the first node
where a plan goes wrong."""

import pytest
import torch

import fxpar
from fxpar.metadata import COMM
from tests.zoo import build


def test_a_correct_plan_checks_every_value():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    assert plan.check(*args) > 100


def _identity(x, group="tp"):
    return x


def test_a_missing_all_reduce_is_found_at_the_first_node_that_reads_it():
    model, args = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    reduces = [n for n in plan.graph_module.graph.nodes if (c := n.meta.get(COMM)) is not None and c.kind == "all_reduce"]
    broken = reduces[1]  # the one after the first attention's output projection
    broken.target = _identity
    plan.graph_module.recompile()
    with pytest.raises(fxpar.DivergenceError) as info:
        plan.check(*args)
    msg = str(info.value)
    reader = next(iter(broken.users))
    assert f"node {reader.name}" in msg
    # the residual add reads it (resid_dropout has p=0: no op in the plan)
    assert "models/gpt.py" in msg and "x = x + self.attn(self.ln_1(x), input_pos, mask)" in msg
    assert "transformer.h.0" in msg


def test_replicated_values_that_differ_between_ranks_are_reported():
    model, args = build("mlp")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    # corrupt rank 1's copy of a replicated weight
    with torch.no_grad():
        plan.rank_module(1).get_parameter("blocks.0.norm.weight").add_(1.0)
    with pytest.raises(fxpar.DivergenceError, match="ranks disagree on the value"):
        plan.check(*args)
