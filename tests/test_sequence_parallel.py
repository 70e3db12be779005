"""Sequence parallelism: the activations between tensor-parallel blocks split along the sequence.

The parallel model trains like the single-device one (simulated and over gloo); the plan has
Megatron's shape (a reduce-scatter where plain TP all-reduces, an all-gather before each
column-parallel block), moves the same bytes on the hidden stream, and keeps less activation
memory per rank, which the memory model predicts.
"""

from collections import defaultdict

import pytest
import torch

import fxpar
from fxpar.metadata import COMM, PLACEMENT
from fxpar.placement import Shard
from tests.test_equivalence_distributed import train_and_compare
from tests.test_equivalence_simulated import check_training
from tests.test_pipeline_simulated import check_pipeline
from tests.test_memory import KORTHIKANTI, estimated_activations, gpt_layer_activations, measured_activations
from tests.zoo import build


def kinds(plan) -> dict[str, int]:
    out = defaultdict(int)
    for n in plan.graph_module.graph.nodes:
        if COMM in n.meta:
            out[n.meta[COMM].kind] += 1
    return dict(out)


def hidden_bytes(plan, hidden_elements: int) -> float:
    """Bytes one rank sends (forward + backward) in collectives on hidden-stream-sized values."""
    return sum(
        n.meta[COMM].bytes + n.meta[COMM].bwd_bytes
        for n in plan.graph_module.graph.nodes
        if COMM in n.meta and n.meta[COMM].elements == hidden_elements
    )


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["gpt", "llama", "mlp"])
def test_reference_models_train_alike(name, tp):
    plan = check_training(name, tp, sequence_parallel=True)
    k = kinds(plan)
    layers = 2 if name != "mlp" else 1
    # every row-parallel output enters the stream reduce-scattered; no activation is all-reduced
    assert k.get("reduce_scatter", 0) >= 2 * layers and "all_reduce" not in k, k
    assert k.get("gather_to_tp", 0) >= 1, k


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_hugging_face_models_train_alike(name):
    pytest.importorskip("transformers")
    plan = check_training(name, 2, sequence_parallel=True)
    assert kinds(plan).get("reduce_scatter", 0) >= 4


def test_the_stream_is_split_along_the_sequence():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, sequence_parallel=True)
    nodes = {n.name: n for n in plan.graph_module.graph.nodes}
    norms = [n for n in nodes.values() if n.target is torch.ops.aten.rsqrt.default]
    assert norms and all(n.meta[PLACEMENT] == Shard.even(1, 16, 2) for n in norms)
    assert len(plan.ctx.sequence_split) > 20
    # the code a rank runs holds 8 of the 16 positions in its norms; the collectives are fused
    # with the linears beside them (overlap=True), or stand alone
    assert "linear_reduce_scatter(" in plan.rank_code(0) and "gathered_linears(" in plan.rank_code(0)
    alone = fxpar.compile(model, fxpar.Mesh(tp=2), args, sequence_parallel=True, overlap=False).rank_code(0)
    assert "fxpar.reduce_scatter(" in alone and "gather_to_tp(" in alone and "gathered_linears(" not in alone


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_same_bytes_as_plain_tp_and_less_activation_memory(name):
    model, args = build(name)
    tp_plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    sp_plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, sequence_parallel=True)
    # the hidden stream is what plain TP all-reduces after each row-parallel block
    (hidden,) = {n.meta[COMM].elements for n in tp_plan.graph_module.graph.nodes
                 if COMM in n.meta and n.meta[COMM].kind == "all_reduce"}
    assert hidden_bytes(sp_plan, hidden) == hidden_bytes(tp_plan, hidden) > 0
    tp_est, sp_est = estimated_activations(tp_plan), estimated_activations(sp_plan)
    for rank, real in enumerate(measured_activations(sp_plan, args)):
        assert abs(sp_est - real) <= 0.05 * real, f"rank {rank}: estimated {sp_est} bytes, autograd kept {real}"
    assert sp_est < 0.9 * tp_est, (sp_est, tp_est)
    print(f"\n{name}: activations per rank, tp=2 {tp_est / 1024:.1f} KiB, tp=2+sp {sp_est / 1024:.1f} KiB")


def test_needs_tp_and_a_divisible_sequence():
    model, args = build("gpt")
    with pytest.raises(ValueError, match="tp > 1"):
        fxpar.compile(model, fxpar.Mesh(tp=1), args, sequence_parallel=True)
    odd = torch.randint(0, 256, (2, 7))
    with pytest.raises(fxpar.FxparError, match="does not split over 2 ranks"):
        fxpar.compile(model, fxpar.Mesh(tp=2), (odd,), sequence_parallel=True)


@pytest.mark.parametrize("name,tp", [("gpt", 2), ("llama", 2), ("llama", 4)])
def test_over_processes(pools, name, tp):
    pools(tp).run(train_and_compare, name, tp, sequence_parallel=True)


@pytest.mark.parametrize("name,dp,pp,schedule", [("gpt", 1, 2, "1f1b"), ("llama", 2, 2, "interleaved"), ("hf_llama", 1, 2, "gpipe")])
def test_with_pipelines_and_replicas(name, dp, pp, schedule):
    plan = check_pipeline(name, dp, pp, 2, schedule, 2, sequence_parallel=True)
    assert plan.ctx.sequence_split


def test_dropout_in_the_stream_draws_the_single_device_masks_in_exact_mode():
    from fxpar.models import gpt

    torch.manual_seed(0)
    model, (idx,) = gpt.build(dropout=0.1, flash=False)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), sequence_parallel=True, rng="exact")
    dropouts = [n for n in plan.graph_module.graph.nodes if n.meta.get("fxpar_rng") == "sharded"]
    assert any(n.name in plan.ctx.sequence_split for n in dropouts)
    assert plan.check(idx, loss_fn=lambda o: o.float().pow(2).mean()) > 100


@pytest.mark.parametrize("name", ["gpt", "llama", "hf_llama"])
def test_recomputed_gathers_train_alike_and_keep_shards(name):
    kept = check_training(name, 2, sequence_parallel=True)
    plan = check_training(name, 2, sequence_parallel=True, recompute_gathers=True)
    assert "gathered_linears" in plan.rank_code(0) and "gather_to_tp(" not in plan.rank_code(0)
    model, args = build(name)
    estimate = estimated_activations(plan)
    assert measured_activations(plan, args) == [estimate] * 2  # what autograd keeps, to the byte
    assert estimate < estimated_activations(kept)
    # one more all-gather per column-parallel block, in backward
    before = sum(n.meta[COMM].bwd_bytes for n in kept.graph_module.graph.nodes if COMM in n.meta)
    after = sum(n.meta[COMM].bwd_bytes for n in plan.graph_module.graph.nodes if COMM in n.meta)
    assert after > before


@pytest.mark.parametrize("tp", [2, 4])
def test_recomputed_gathers_match_korthikanti(tp):
    """A GPT layer with sequence parallelism keeps s*b*h/t*(34 + 5*a*s/h) bytes (16-bit, dropout on)."""
    h, a, s, b = (KORTHIKANTI[k] for k in "hasb")
    estimate = gpt_layer_activations(tp, sequence_parallel=True, recompute_gathers=True)
    formula = s * b * h / tp * (34 + 5 * a * s / h)
    assert abs(estimate - formula) <= 0.05 * formula, (estimate, formula)


def test_recomputed_gathers_over_processes(pools):
    pools(2).run(train_and_compare, "llama", 2, sequence_parallel=True, recompute_gathers=True)


def test_symbolic_batch_static_sequence():
    model, (idx,) = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), dynamic_shapes={"idx": {0: "batch"}}, sequence_parallel=True)
    assert plan.ctx.sequence_split
    for b in (1, 3):
        x = torch.randint(0, 256, (b, 16))
        assert torch.allclose(plan.simulate(x), model(x), atol=1e-5)
    with pytest.raises(fxpar.FxparError, match="static"):
        fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), dynamic_shapes={"idx": {1: "seq"}}, sequence_parallel=True)
