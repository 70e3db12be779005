"""Recomputation (``recompute="selective"|"full"|"auto"``): training equals the single-device
model's, dropout masks are remade as drawn, the memory model counts what autograd keeps and what a
remake holds, Korthikanti et al.'s per-layer formulas hold, and ``"auto"`` fits a memory limit."""

import pytest
import torch

import fxpar
from fxpar.memory import activations
from fxpar.metadata import RECOMPUTE
from fxpar.models import gpt, llama
from fxpar.runtime.recompute import Recomputed
from fxpar.simulate import run_ranks
from tests.test_dropout_rng import trains_with_the_same_masks
from tests.test_memory import KORTHIKANTI, gpt_layer_activations, measured_activations
from tests.test_pipeline_distributed import train
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import assert_close, loss_fn


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("dp, pp, tp", [(1, 1, 1), (1, 2, 1), (2, 1, 2)], ids=str)
@pytest.mark.parametrize("name", ["gpt_matmul", "llama", "hf_llama"])
def test_training_equals_one_device(name, dp, pp, tp, mode):
    plan = check_pipeline(name, dp, pp, tp, "1f1b", 2, recompute=mode)
    assert plan.ctx.recomputed and "plan_recompute" in plan.ctx.passes
    kinds = {n.meta[RECOMPUTE] for n in plan.graph_module.graph.nodes if RECOMPUTE in n.meta}
    assert kinds == set(plan.ctx.recomputed)
    if mode == "selective":
        assert all(r.endswith("attention core") for r in kinds)


@pytest.mark.parametrize("options", [dict(zero=3), dict(zero=1, precision="bf16"),
                                     dict(sequence_parallel=True, precision="bf16"),
                                     dict(sequence_parallel=True, zero=3, precision="bf16")], ids=str)
def test_with_zero_precision_and_sequence_parallel(options):
    """The same numbers, bit for bit, as the same plan without recomputation, and every layer
    recomputed (the collectives sequence parallelism adds go with the layer that reads them)."""
    model, (idx,) = llama.build()
    args = (torch.cat([idx, idx]),)
    plans = [fxpar.compile(model, fxpar.Mesh(dp=2, tp=2), args, microbatches=1, recompute=mode, **options)
             for mode in ("none", "full")]
    assert plans[1].ctx.recomputed == ["layers.0", "layers.1"]
    (la, ga), (lb, gb) = (p.simulate_train(loss_fn, *args) for p in plans)
    assert torch.equal(la, lb) and all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_dropout_masks_are_remade_as_drawn(mode):
    """With rng="exact" the plan draws the single-device masks; a remade region must draw them
    again, or the gradients would not match."""
    torch.manual_seed(0)
    model, (idx,) = gpt.build(dropout=0.2, flash=False)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), rng="exact", recompute=mode)
    trains_with_the_same_masks(plan, model, idx)


def _long_gpt():
    model, _ = gpt.build(flash=False, n_layer=4, block_size=128, dropout=0.1)
    return model, (torch.randint(0, 256, (2, 128)),)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_estimate_is_what_autograd_keeps(mode, tp):
    model, args = _long_gpt()
    plan = fxpar.compile(model, fxpar.Mesh(tp=tp), args, recompute=mode)
    estimate = plan.memory()[0].activations
    for rank, real in enumerate(measured_activations(plan, args)):
        assert estimate == real, f"rank {rank}: estimated {estimate} bytes, autograd kept {real}"


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_a_remade_region_keeps_what_the_estimate_says(mode, monkeypatch):
    """What each region's ops keep when backward remakes it (measured by running its body as the
    remake does) equals the memory model's ``remade``."""
    model, args = _long_gpt()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute=mode)
    gm = plan.graph_module
    nodes = list(gm.graph.nodes)
    _, regions = activations(nodes, {n.name: n for n in nodes})
    kept: dict[str, int] = {}

    def measured(self, *inputs):
        storages, inside = {}, set()

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.body(*inputs)
        given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        kept[self.region] = sum(b for p, b in storages.items() if p not in given and p not in inside)
        return out

    monkeypatch.setattr(Recomputed, "forward", measured)
    mod = plan.rank_module(0)
    run_ranks(lambda r: mod(*args) if r == 0 else plan.rank_module(r)(*args), plan._contexts())
    assert kept.keys() == regions.keys()
    for name, real in kept.items():
        assert regions[name].remade == real, f"{name}: estimated {regions[name].remade}, remade {real}"


@pytest.mark.parametrize("tp", [1, 2])
def test_a_gpt_layer_matches_korthikanti(tp):
    """Per layer, 16-bit: sbh(34 + 5as/h) kept without recomputation (with tp: 10 + 24/t + 5as/ht),
    the attention term gone with selective recomputation, the layer's input 2sbh with full."""
    h, a, s, b = (KORTHIKANTI[k] for k in "hasb")
    t = tp
    body = 34 if t == 1 else 10 + 24 / t
    formula = {"none": s * b * h * (body + 5 * a * s / (h * t)), "selective": s * b * h * body, "full": 2 * s * b * h}
    for mode, expect in formula.items():
        estimate = gpt_layer_activations(tp, recompute=mode)
        assert abs(estimate - expect) <= 0.03 * expect, (mode, estimate, expect)


def test_auto_fits_the_limit_with_the_fewest_flops():
    """Below the peak without recomputation, "auto" fits the limit, computes what the plan without
    it computes, and recomputes fewer FLOPs than "full" where "selective" would not fit."""
    model, args = _long_gpt()
    peak = {m: fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute=m).memory()[0] for m in ("none", "selective", "full")}
    limit = (peak["selective"].peak + peak["full"].peak) // 2
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="auto", memory_limit=limit)
    mine = plan.memory()[0]
    assert mine.peak <= limit < peak["selective"].peak
    assert 0 < mine.recompute_flops < peak["full"].recompute_flops
    assert "recompute 'auto'" in plan.summary() and "GFLOP" in plan.summary()
    reference = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    torch.manual_seed(1)
    la, ga = reference.simulate_train(loss_fn, *args)
    torch.manual_seed(1)
    lb, gb = plan.simulate_train(loss_fn, *args)
    assert torch.equal(la, lb)
    for k in ga:
        assert_close(gb[k], ga[k], k)


def test_auto_first_remakes_what_costs_no_matmul():
    """Just below the peak without recomputation, runs of ops without matmuls (a norm's
    arithmetic, an activation, dropout) inside the layers suffice: node-level regions, no FLOPs."""
    model, args = _long_gpt()
    peak = fxpar.compile(model, fxpar.Mesh(tp=2), args).memory()[0].peak
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="auto", memory_limit=int(peak * 0.97))
    assert plan.memory()[0].peak <= peak * 0.97 and plan.memory()[0].recompute_flops == 0
    assert any(" ops " in r for r in plan.ctx.recomputed)


def test_auto_says_when_nothing_fits():
    model, args = _long_gpt()
    full = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="full").memory()[0].peak
    with pytest.raises(fxpar.FxparError, match="memory_limit"):
        fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="auto", memory_limit=int(full * 0.8))
    with pytest.raises(fxpar.FxparError, match="give memory_limit"):
        fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="auto")


def test_the_listing_shows_what_is_recomputed():
    model, args = _long_gpt()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="selective")
    code = plan.rank_code(0)
    compile(code, "rank0.py", "exec")
    assert code.count("# backward recomputes the lines down to") == 4
    assert "self.recompute_0(" not in code and "aten.softmax(" in code


def test_symbolic_sizes():
    """A plan with a symbolic batch size counts, at batch 8, what a plan captured at 8 counts."""
    model, args = _long_gpt()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, recompute="full", dynamic_shapes={"idx": {0: "batch"}})
    at8 = fxpar.compile(model, fxpar.Mesh(tp=2), (torch.cat([args[0]] * 4),), recompute="full").memory()[0]
    sym = plan.memory(batch=8)[0]
    assert (sym.activations, sym.recomputed, sym.recompute_flops) == (at8.activations, at8.recomputed, at8.recompute_flops)


# over gloo ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh, mode", [((1, 2, 1), "full"), ((2, 1, 2), "selective")], ids=str)
def test_training_over_gloo(pools, mesh, mode):
    pools(mesh[0] * mesh[1] * mesh[2]).run(train, "llama", *mesh, "1f1b", 2, recompute=mode)
