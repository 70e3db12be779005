"""Stage cutting: by the memory each stage will really need under the schedule."""

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.models import llama
from tests.zoo import assert_close, build


def meta_llama(layers=8):
    with torch.device("meta"):
        return llama.Transformer(llama.ModelArgs(dim=512, n_layers=layers, n_heads=8, vocab_size=4096, multiple_of=64))


def peaks(plan):
    return [m.peak for m in plan.memory()]


def test_in_flight_follows_the_schedule():
    model = meta_llama()
    tokens = torch.randint(0, 4096, (8, 128))
    one = fxpar.compile(model, fxpar.Mesh(pp=4), (tokens,), schedule="1f1b", microbatches=8)
    assert [s.memory.in_flight for s in one.ctx.pipeline.stages] == [4, 3, 2, 1]
    gp = fxpar.compile(model, fxpar.Mesh(pp=4), (tokens,), schedule="gpipe", microbatches=8)
    assert [s.memory.in_flight for s in gp.ctx.pipeline.stages] == [8, 8, 8, 8]
    # the first 1F1B stage keeps 4 microbatches: it gets fewer layers than the last
    first, last = one.ctx.pipeline.stages[0], one.ctx.pipeline.stages[-1]
    assert len(first.nodes) < len(last.nodes)


@pytest.mark.parametrize("pp", [2, 4])
def test_cut_by_memory_beats_equal_layer_counts(pp):
    model = meta_llama()
    tokens = torch.randint(0, 4096, (8, 256))
    plan = fxpar.compile(model, fxpar.Mesh(pp=pp), (tokens,), schedule="1f1b", microbatches=8)
    per = 8 // pp
    equal = fxpar.compile(model, fxpar.Mesh(pp=pp), (tokens,), schedule="1f1b", microbatches=8,
                          split_points=[f"layers.{per * k}" for k in range(1, pp)])
    assert max(peaks(plan)) <= max(peaks(equal))
    assert max(peaks(plan)) / (sum(peaks(plan)) / pp) <= 1.10


def test_split_points_by_module_name():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), (torch.cat([args[0]] * 2),), microbatches=2, split_points=["layers.1"])
    assert plan.ctx.pipeline.stages[1].modules[0].startswith("layers.1")
    with pytest.raises(fxpar.PlanError, match="names no module"):
        fxpar.compile(model, fxpar.Mesh(pp=2), args, split_points=["layers.9"])


def test_a_memory_cap_no_cut_fits_is_refused():
    model = meta_llama()
    with pytest.raises(fxpar.PlanError, match=r"no cut into 2 stages fits 0\.01 GiB per device: pipeline rank \d \(stage \d"):
        fxpar.compile(model, fxpar.Mesh(pp=2), (torch.randint(0, 4096, (2, 64)),), memory_limit=0.01 * (1 << 30))


class LongSkip(nn.Module):
    """The first block's output is used again at the very end: it crosses every cut."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(4))

    def forward(self, x):
        first = self.blocks[0](x)
        h = first
        for b in self.blocks[1:]:
            h = h + b(h)
        return h * first


def test_values_skip_over_stages():
    torch.manual_seed(0)
    model, x = LongSkip(), torch.randn(8, 16)
    plan = fxpar.compile(model, fxpar.Mesh(pp=4), (x,), schedule="gpipe", microbatches=2)
    stages = plan.ctx.pipeline.stages
    skipping = [name for s in stages for name, dsts in s.sinks.items() if max(dsts) > s.index + 1]
    assert skipping, "some value should go straight to a later stage"
    loss, grads = plan.simulate_train(lambda out: out.pow(2).mean(), x)
    model(x).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name}")


def test_values_that_need_no_gradient_are_recomputed_not_sent():
    model, args = build("llama")  # the rotary table is sliced from a buffer on every stage
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), args)
    sent = [name for s in plan.ctx.pipeline.stages for name in s.outputs]
    by_name = {n.name: n for n in plan.graph_module.graph.nodes}
    assert all(by_name[name].meta["fxpar_requires_grad"] for name in sent), sent
    assert "freqs_cis" in plan.ctx.pipeline.stages[1].params



@pytest.mark.parametrize("name, schedule", [("gpt", "1f1b"), ("llama", "interleaved"), ("mlp", "gpipe"),
                                            ("llama", "zbh1"), ("gpt", "zbv")])
def test_the_cut_optimizes_the_memory_it_reports(name, schedule):
    """The fast cost the cutter minimizes is the stage memory the plan reports."""
    from fxpar.stages import compute_nodes, replicable
    from fxpar.passes.cut_stages import _Costs

    model, args = build(name)
    args = (torch.cat([args[0]] * 4),)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), args, schedule=schedule, microbatches=4)
    gm, spec = plan.graph_module, plan.ctx.pipeline
    seq = compute_nodes(gm, replicable(gm))
    deferring = schedule.startswith("zb")
    costs = _Costs(gm, seq, plan.ctx.options.optimizer, spec.sizes, plan.ctx.dim_names, deferring=deferring)
    starts = [next(i for i, n in enumerate(seq) if n.name == s.nodes[0]) for s in spec.stages] + [len(seq)]
    for s, m, a, b in zip(spec.stages, plan.memory(), starts, starts[1:]):
        factor = (s.memory.in_flight, s.memory.deferred_in_flight)
        assert costs.cost(a, b, factor) == pytest.approx(float(m.peak)), f"stage {s.index}"
        assert (s.memory.deferred > 0) == deferring  # what W keeps counts (a zero-bubble schedule)


@pytest.mark.parametrize("name, schedule", [("llama", "1f1b"), ("gpt", "zbh1"), ("moe", "1f1b")])
def test_a_growing_stage_costs_what_the_whole_stage_does(name, schedule, monkeypatch):
    """The greedy cut grows a stage one node at a time (``_Growing``): after every step its
    cost equals the cost of the whole stage computed afresh, from every start."""
    from fxpar.passes import cut_stages

    seen = []
    greedy = cut_stages._greedy

    def checked(c, factors, budget):
        n = len(c.seq)
        for a in range(0, n - 1, max(1, n // 12)):
            stage = cut_stages._Growing(c, a)
            for b in range(a + 1, n + 1):
                stage.extend()
                assert stage.cost((3, 2)) == pytest.approx(c.cost(a, b, (3, 2)), rel=1e-9), (a, b)
                seen.append(b)
        return greedy(c, factors, budget)

    monkeypatch.setattr(cut_stages, "_greedy", checked)
    model, args = build(name)
    fxpar.compile(model, fxpar.Mesh(pp=2, tp=2), (torch.cat([args[0]] * 4),), microbatches=4, schedule=schedule)
    assert seen


def test_a_later_program_keeps_weights_several_stages_read_where_they_were():
    """Eight stages of a two-layer Llama (ZBV at pp=4): the rotary table is read by two stages.
    The program with the loss, planned to keep the first program's stages, keeps it in those
    two: its pipeline ranks hold what they held."""
    from tests.zoo import loss_with_target, pipeline_case

    model, args, target = pipeline_case("llama", 4)
    mesh = fxpar.Mesh(pp=4, tp=2)
    first = fxpar.compile(model, mesh, args, schedule="zbv", microbatches=4)
    spec = first.ctx.pipeline
    assert any(len(js) > 1 for js in spec.tied.values())
    keep = {p: list(spec.tied[p]) if p in spec.tied else s.index for s in spec.stages for p in s.params}
    later = fxpar.compile(model, mesh, args, schedule="zbv", microbatches=4, loss_fn=loss_with_target,
                          example_target=target, param_stages=keep)
    assert [sorted(s.params) for s in later.ctx.pipeline.stages] == [sorted(s.params) for s in spec.stages]
