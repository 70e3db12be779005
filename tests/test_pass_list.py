"""The pass list says what runs, options are frozen and results typed, collectives are
``torch.ops.fxpar`` ops, and every rank's listing is short, valid Python."""

import dataclasses

import pytest
import torch

import fxpar
from fxpar.pipeline import PIPELINE, passes_run
from fxpar.plan_context import Decision, PlanContext
from fxpar.options import PlanOptions
from tests.zoo import build


def test_the_pass_list_names_what_runs_for_each_mesh_and_option():
    plain = passes_run(PlanContext(fxpar.Mesh(tp=2)))
    assert plain == ["annotate_tensors", "plan_sharding", "insert_collectives", "collective_matmuls", "assign_rng",
                     "localize_shapes", "estimate_memory", "cut_stages", "overlap_collectives"]
    assert passes_run(PlanContext(fxpar.Mesh(tp=2), PlanOptions(overlap=False))) == plain[:3] + plain[4:-1]
    sp = passes_run(PlanContext(fxpar.Mesh(tp=2), PlanOptions(sequence_parallel=True, recompute_gathers=True)))
    assert sp.index("plan_sharding") < sp.index("sequence_parallel") < sp.index("insert_collectives")
    assert sp.index("insert_collectives") < sp.index("recompute_gathers") < sp.index("collective_matmuls")
    cp = passes_run(PlanContext(fxpar.Mesh(cp=2, tp=2)))
    assert cp[:3] == ["split_loss_means", "context_parallel.annotate_tensors", "context_parallel.split_sequence"]
    assert "context_parallel.cp_rank_program" in cp and cp.count("insert_collectives") == 1
    assert "expert_parallel" in passes_run(PlanContext(fxpar.Mesh(ep=2)))
    zero = passes_run(PlanContext(fxpar.Mesh(dp=2), PlanOptions(zero=3)))
    assert zero.index("localize_shapes") < zero.index("plan_weights") < zero.index("estimate_memory")
    assert zero[-2:] == ["cut_stages", "gather_weights"]
    both = passes_run(PlanContext(fxpar.Mesh(dp=2), PlanOptions(zero=3, recompute="full")))
    assert both[-3:] == ["cut_stages", "plan_recompute", "gather_weights"]
    zb = passes_run(PlanContext(fxpar.Mesh(pp=2), PlanOptions(schedule="zbh1", recompute="selective")))
    assert zb[-3:] == ["cut_stages", "plan_recompute", "split_backward"]
    assert "split_backward" not in passes_run(PlanContext(fxpar.Mesh(pp=2)))
    assert "collective_matmuls" not in passes_run(PlanContext(fxpar.Mesh(pp=2, tp=2), PlanOptions(schedule="zbh1")))
    assert len(PIPELINE) == 18 and all(callable(step.when) for step in PIPELINE)


def test_the_summary_lists_the_passes_that_ran():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(cp=2, tp=2), args)
    line = next(x for x in plan.summary().splitlines() if x.startswith("passes: "))
    assert "context_parallel.split_sequence" in line and "sequence_parallel" not in line


def test_options_are_frozen_and_decisions_are_values():
    model, args = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, overrides={"lm_head": "replicate"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.ctx.options.microbatches = 2
    head = plan.ctx.decisions["lm_head"]
    assert isinstance(head, Decision) and (head.style, head.why) == ("replicate", "user override")
    assert plan.ctx.decisions["transformer.h.0.attn.c_attn"].style == "colwise"
    assert Decision("colwise").why is None and Decision("colwise") == "colwise"


def test_collectives_are_torch_library_ops():
    model, args = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    comms = [n for n in plan.graph_module.graph.nodes if n.meta.get("fxpar_comm") is not None]
    assert comms and all(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fxpar" for n in comms)
    assert {n.name for n in comms} >= {"all_reduce", "copy_to_tp"}  # named like ATen's nodes, no "_default"
    assert "torch.ops.fxpar.all_reduce(" in plan.rank_module(0).code
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="group"):  # the schema checks a call's arguments
        torch.ops.fxpar.all_reduce(x, group=2)


@pytest.mark.parametrize("name,mesh,options", [
    ("gpt", dict(tp=2, pp=2), dict(microbatches=2)),
    ("llama", dict(cp=2, tp=2), {}),
    ("gpt", dict(tp=2), dict(sequence_parallel=True, recompute_gathers=True)),
    ("moe", dict(ep=2), {}),
], ids=["gpt-pp", "llama-cp", "gpt-sp", "moe-ep"])
def test_every_rank_listing_is_short_valid_python(name, mesh, options):
    model, args = build(name)
    plan = fxpar.compile(model, fxpar.Mesh(**mesh), args, **options)
    for r in range(plan.mesh.size):
        code = plan.rank_code(r)
        compile(code, f"rank{r}.py", "exec")
        assert max(len(line) for line in code.splitlines()) <= 120, f"rank {r}"
        assert "= None" not in code and "/work/" not in code
        assert code.count("def forward(") == max(1, len(plan.program(r).stages) if plan.mesh.pp > 1 else 1)
