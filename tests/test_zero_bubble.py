"""Zero-bubble schedules: backward split into B (input gradients) and W (weight gradients) by
``passes/split_backward.py``. W's gradients wait until W runs, what they keep is what the memory
model says, training equals one device (``test_pipeline_simulated.py`` and
``test_pipeline_distributed.py`` run the schedules on every mesh), and what cannot be split is
refused with its reason."""

import gc
import weakref

import pytest
import torch

import fxpar
from fxpar.metadata import DEFERRED
from fxpar.ops import deferred
from fxpar.runtime.pipeline import PipelineRunner
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import assert_close, loss_with_target, pipeline_case


@pytest.mark.parametrize("last", ["mm", "einsum"])  # gradients written out; a job with an autograd graph of its own
def test_weight_gradients_wait_for_w_and_the_output_is_not_kept(last):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    w2 = torch.randn(16, 16, requires_grad=True)
    jobs = []
    with deferred.collecting(jobs):
        y = deferred.later(torch.ops.aten.linear.default, (1, 2), x, w, b)
        if last == "mm":  # the weight on the left
            out = deferred.later(torch.ops.aten.mm.default, (0,), w2.t(), y.view(8, 16).t())
        else:
            out = deferred.later(torch.ops.aten.einsum.default, (2,), "tc,oc->to", [y.view(8, 16), w2])
    assert not out._is_view()
    seen = weakref.ref(out)
    out.pow(2).sum().backward()
    del out
    gc.collect()
    assert seen() is None  # a job keeps its output's gradient, not the output
    assert x.grad is not None and w.grad is None and b.grad is None and w2.grad is None
    assert len(jobs) == 2
    deferred.run(jobs)
    assert not jobs
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b, w2)]
    y_ref = torch.nn.functional.linear(ref[0], ref[1], ref[2]).view(8, 16)
    (torch.mm(ref[3].t(), y_ref.t()) if last == "mm" else y_ref @ ref[3].t()).pow(2).sum().backward()
    for got, r, name in zip((x, w, b, w2), ref, ("x", "w", "b", "w2")):
        assert_close(got.grad, r.grad, name)


aten = torch.ops.aten
OPS = {  # op, its arguments (x an activation, the rest weights), the flat positions of the weights
    "linear": (aten.linear.default, lambda x, w, b: (x, w, b), (1, 2)),
    "linear without bias": (aten.linear.default, lambda x, w, b: (x, w), (1,)),
    "matmul": (aten.matmul.default, lambda x, w, b: (x, w.t()), (1,)),
    "mm": (aten.mm.default, lambda x, w, b: (x.reshape(-1, 8), w.t()), (1,)),
    "addmm (Conv1D)": (aten.addmm.default, lambda x, w, b: (b, x.reshape(-1, 8), w.t()), (0, 2)),
    "addmm, a bias of one element": (aten.addmm.default, lambda x, w, b: (b[:1], x.reshape(-1, 8), w.t()), (0, 2)),
    "linear of an input that needs no gradient": (aten.linear.default, lambda x, w, b: (x.detach(), w, b), (1, 2)),
    "einsum (autograd of its own)": (aten.einsum.default, lambda x, w, b: ("btc,oc->bto", [x, w]), (2,)),
    "conv1d (autograd of its own)": (aten.conv1d.default, lambda x, w, b: (x.transpose(1, 2), w[:, :, None], b),
                                     (1, 2)),
}


@pytest.mark.parametrize("name", OPS)
def test_every_spelling_gives_autograds_gradients(name):
    op, make_args, weights = OPS[name]
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True),
              torch.randn(16, requires_grad=True)]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    jobs = []
    with deferred.collecting(jobs):
        out = deferred.later(op, weights, *make_args(*leaves))
    (out.sin().sum()).backward()
    assert leaves[1].grad is None
    deferred.run(jobs)
    op(*make_args(*ref)).sin().sum().backward()
    for got, r, what in zip(leaves, ref, ("input", "weight", "bias")):
        if r.grad is not None:
            assert_close(got.grad, r.grad, f"{name} {what}")


def test_outside_a_schedule_the_op_is_itself():
    x, w = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    y = deferred.later(torch.ops.aten.linear.default, (1,), x, w)
    y.sum().backward()
    assert w.grad is not None  # no collecting(): plain autograd


@pytest.mark.parametrize("name, tp", [("llama", 2), ("gpt", 1), ("hf_llama", 2)])
def test_what_w_keeps_is_the_estimate(name, tp, monkeypatch):
    """Bytes held between B and W (the activation inputs of the deferred matmuls and their
    output gradients, each storage once), measured at each W, equal ``StageMemory.deferred``."""
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    model, args, target = pipeline_case(name, 2)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2, tp=tp), args, schedule="zbh1", microbatches=2)
    measured = {}
    run_w = PipelineRunner._w

    def counting(self, a, st):
        storages = {}
        for job in st.jobs.get((a.stage, a.mb), []):
            for t in job.kept():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        measured.setdefault(a.stage, set()).add(sum(storages.values()))
        return run_w(self, a, st)

    monkeypatch.setattr(PipelineRunner, "_w", counting)
    plan.simulate_train(loss_with_target, *args, target=target)
    for s in plan.ctx.pipeline.stages:
        assert measured[s.index] == {s.memory.deferred}, (s.index, measured[s.index], s.memory.deferred)


def test_the_memory_model_counts_w_and_the_cut_plans_for_it():
    model, args, _ = pipeline_case("llama", 4)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), args, schedule="zbh1", microbatches=4)
    first, last = (s.memory for s in plan.ctx.pipeline.stages)
    # ZB-H1 keeps 1F1B's activations; the last rank holds back one W behind each B
    assert (first.in_flight, last.in_flight) == (2, 1)
    assert (first.deferred_in_flight, last.deferred_in_flight) == (1, 2)
    assert last.activations == last.activations_per_microbatch + 2 * last.deferred
    assert 0 < last.deferred < last.activations_per_microbatch
    marked = [n for n in plan.graph_module.graph.nodes if DEFERRED in n.meta]
    assert marked and all(n.target in (torch.ops.aten.linear.default, torch.ops.aten.matmul.default) for n in marked)
    assert "deferred_later" in plan.stage_module(0, 0).code  # the rank's program calls them through later()


@pytest.mark.parametrize("options", [dict(zero=1, dp=2), dict(precision="bf16"), dict(recompute="selective")])
def test_with_zero_precision_and_recompute(options):
    dp = options.pop("dp", 1)
    if options.get("precision") == "bf16":  # compared with 1F1B under the same precision
        model, args, target = pipeline_case("llama", 2)
        got = {}
        for schedule in ("1f1b", "zbh1"):
            torch.manual_seed(0)
            plan = fxpar.compile(model, fxpar.Mesh(pp=2), args, schedule=schedule, microbatches=2, **options)
            got[schedule] = plan.simulate_train(loss_with_target, *args, target=target)
        assert_close(got["zbh1"][0], got["1f1b"][0], "loss")
        for k, g in got["1f1b"][1].items():
            assert_close(got["zbh1"][1][k], g, k, rtol=1e-2, atol=1e-3)
        return
    check_pipeline("llama", dp, 2, 1, "zbh1", 2, **options)


@pytest.mark.parametrize("zero", [2, 3])
def test_nothing_to_defer_is_refused_with_its_reason(zero):
    model, args, _ = pipeline_case("llama", 4)
    with pytest.raises(fxpar.PlanError, match=rf"read weights whose gradients zero={zero} .* reduces a layer at a "
                                              r"time.*or zero=1 without offload"):
        fxpar.compile(model, fxpar.Mesh(dp=2, pp=2), args, schedule="zbh1", microbatches=2, zero=zero)


def test_recomputed_layers_keep_their_weight_gradients_in_b():
    model, args, _ = pipeline_case("llama", 4)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), args, schedule="zbh1", microbatches=2, recompute="full")
    marked = [n for n in plan.graph_module.graph.nodes if DEFERRED in n.meta]
    assert [list(n.meta["nn_module_stack"].values())[-1][0] for n in marked] == ["output"]  # the head, outside the layers


def test_torch_compile_is_refused_before_anything_runs():
    model, args, _ = pipeline_case("mlp", 2)
    with pytest.raises(fxpar.OptionError, match="torch.compile's graphs cannot"):
        fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=args, schedule="zbv", compile=True)
