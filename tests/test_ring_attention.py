"""Ring attention for context parallelism (``context_parallel="ring"``, ``fxpar/ops/ring.py``):
each cp rank keeps its own positions, key/value blocks go around the ring. Training equals one
device (causal, RoPE, with tp, with a pipeline, over gloo); the causal work is balanced by the
zigzag layout; what it keeps is the memory estimate; "auto" picks it where heads do not divide."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.metadata import COMM
from fxpar.ops.ring import _pairs, _positions
from fxpar.passes.context_parallel import runs_text, zigzag
from fxpar.placement import Shard
from tests.test_context_parallel import kinds
from tests.test_equivalence_distributed import train_and_compare
from tests.test_equivalence_simulated import check_training
from tests.test_memory import estimated_activations, measured_activations
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import build

MESHES = [dict(cp=2), dict(cp=4), dict(cp=2, tp=2)]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_llama_causal_with_rope(mesh):
    plan = check_training("llama", mesh=fxpar.Mesh(**mesh), context_parallel="ring")
    got = kinds(plan)
    assert got[("ring", "cp")] == 2 and not got[("all_to_all", "cp")]  # one ring per layer, no Ulysses
    code = plan.rank_code(0)
    assert "fxpar.ring_attention(" in code
    assert f'runs="{runs_text(zigzag(1, 16, mesh["cp"]))}"' in code  # the sequence split zigzag
    assert "ring attention" in plan.summary()


@pytest.mark.parametrize("name, mesh", [("gpt", dict(cp=2)), ("hf_llama", dict(cp=2)), ("gpt", dict(cp=4, tp=2))])
def test_other_models(name, mesh):
    """Learned positions (GPT), Hugging Face's own mask and position ids, GQA heads."""
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    plan = check_training(name, mesh=fxpar.Mesh(**mesh), context_parallel="ring")
    assert kinds(plan)[("ring", "cp")] == 2


def test_auto_takes_ring_where_heads_do_not_divide():
    model, args = build("llama")  # 4 heads
    assert kinds(fxpar.compile(model, fxpar.Mesh(cp=2, tp=2), args))[("ring", "cp")] == 0  # 4 / (2 x 2): Ulysses
    ring = kinds(fxpar.compile(model, fxpar.Mesh(cp=4, tp=2), args))
    assert ring[("ring", "cp")] == 2 and not ring[("all_to_all", "cp")]
    forced = kinds(fxpar.compile(model, fxpar.Mesh(cp=4, tp=2), args, context_parallel="ulysses"))
    assert not forced[("ring", "cp")]  # then the keys and values are gathered, as before


def test_with_a_pipeline_and_tp():
    check_pipeline("llama", 1, 2, 2, "1f1b", 2, cp=2, context_parallel="ring")


def test_with_a_zero_bubble_pipeline():
    check_pipeline("llama", 1, 2, 1, "zbh1", 2, cp=2, context_parallel="ring")


@pytest.mark.parametrize("tp", [1, 2])
def test_over_gloo(pools, tp):
    mesh = fxpar.Mesh(cp=2, tp=tp)
    counts = pools(mesh.size).run(train_and_compare, "llama", tp, mesh, context_parallel="ring")
    assert len(set(counts)) == 1


def _work(runs: str, world: int) -> list[int]:
    """Score elements each rank computes in its w steps (a partly hidden pair counts whole)."""
    pos = _positions(runs)
    out = []
    for r in range(world):
        total = 0
        for step in range(world):
            for rows, cols, _ in _pairs(pos[r], pos[(r - step) % world], True):
                total += (rows.stop - rows.start) * (cols.stop - cols.start)
        out.append(total)
    return out


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_the_causal_work(world):
    size = 16 * world
    balanced = _work(runs_text(zigzag(1, size, world)), world)
    assert len(set(balanced)) == 1
    contiguous = _work(runs_text(Shard.even(1, size, world)), world)
    assert max(contiguous) > 1.5 * min(contiguous)  # the last rank sees every key, the first only its own
    # and the pairs a causal mask hides whole are never computed: a bit over half of all scores
    assert sum(balanced) <= 0.625 * size * size


def test_what_ring_attention_keeps_is_the_estimate():
    """Per rank only its own positions' q, k, v, output and log-sum-exp: activations fall with
    cp and equal what autograd keeps in a run."""
    model, args = build("llama")
    args = (torch.randint(0, 256, (2, 64)),)
    one = estimated_activations(fxpar.compile(model, fxpar.Mesh(tp=1), args))
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), args, context_parallel="ring")
    two = estimated_activations(plan)
    assert two < 0.6 * one, (one, two)
    assert set(measured_activations(plan, args)) == {two}


def test_traffic_is_counted():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(cp=4), args, context_parallel="ring")
    ring = [n for n in plan.graph_module.graph.nodes if (c := n.meta.get(COMM)) is not None and c.kind == "ring"]
    q = ring[0].args[0].meta["val"]  # one rank's queries; keys and values are repeated to their heads
    assert ring[0].meta[COMM].bytes == 3 * 2 * q.numel() * q.element_size()  # w-1 steps of k and v
    assert "cp ring" in plan.summary()


def test_bad_option():
    model, args = build("llama")
    with pytest.raises(fxpar.OptionError, match="context_parallel='zigzag' is not one of"):
        fxpar.compile(model, fxpar.Mesh(cp=2), args, context_parallel="zigzag")


def test_the_cost_model_counts_its_compute(monkeypatch):
    from fxpar import cost

    model, args = build("llama")
    args = (torch.randint(0, 256, (2, 64)),)
    priced = []
    op_time = cost._op_time
    monkeypatch.setattr(cost, "_op_time", lambda node, *a: priced.append(node.name) or op_time(node, *a))
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), args, context_parallel="ring")
    cost.estimate_plan(plan, "h100-80gb")
    ring = [n.name for n in plan.graph_module.graph.nodes if (c := n.meta.get(COMM)) is not None and c.kind == "ring"]
    assert ring and set(ring) <= set(priced)  # its compute counts (it is also a collective)


class GroupedQuery(torch.nn.Module):
    """Attention with one key/value head for four query heads, handed to SDPA as such
    (``enable_gqa=True``), not repeated by the model."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(32, 8), torch.nn.Linear(32, 8)
        self.o = torch.nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = (f(x).view(b, t, 1, 8).transpose(1, 2) for f in (self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, 32))


@pytest.mark.parametrize("cp", [2, 4])
def test_grouped_query_keys_travel_with_their_own_heads(cp):
    """The ring moves a group's key/value head once (a quarter of the repeated bytes here), and
    training still equals one device."""
    torch.manual_seed(0)
    model, x = GroupedQuery(), torch.randn(2, 16, 32)
    plan = fxpar.compile(model, fxpar.Mesh(cp=cp), (x,), context_parallel="ring")
    loss, grads = plan.simulate_train(lambda out: out.pow(2).mean(), x)
    ref = model(x).pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    ring = [n for n in plan.graph_module.graph.nodes if (c := n.meta.get(COMM)) is not None and c.kind == "ring"]
    local_kv = 2 * (2 * 1 * (16 // cp) * 8) * 4  # k and v of one rank: batch 2, 1 head, its positions, fp32
    assert ring[0].meta[COMM].bytes == (cp - 1) * local_kv
