"""Mixture-of-experts models under tensor parallelism: every expert split inside (column- then
row-parallel), the experts of a layer summed by one all-reduce, trained like the single-device
model. Two ways users write experts: a list of modules looped over with the tokens each got
(``models/moe.py``: data-dependent sizes) and Hugging Face's stacked expert weights with grouped
matmuls over tokens sorted by expert (Mixtral, Qwen3-MoE)."""

from collections import Counter

import pytest

import fxpar
from fxpar.capture import capture
from fxpar.memory import data_dependent_sizes
from fxpar.metadata import COMM
from fxpar.placement import Shard
from tests.test_equivalence_distributed import train_and_compare
from tests.test_equivalence_simulated import check_training
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import build, hf_family, hf_loss


def kinds(plan) -> Counter:
    return Counter(n.meta[COMM].kind for n in plan.graph_module.graph.nodes if COMM in n.meta)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_reference_moe_trains_alike(tp):
    plan = check_training("moe", tp)
    if tp == 1:
        return
    experts = {k: v for k, v in plan.ctx.decisions.items() if ".experts." in k}
    assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w3, w2)
    assert all(v == ("rowwise" if k.endswith("w2") else "colwise") for k, v in experts.items()), experts
    # the embedding, then per layer one for attention and one for all its experts together
    assert kinds(plan)["all_reduce"] == 1 + 2 * 2, kinds(plan)


def test_reference_moe_with_sequence_parallelism():
    plan = check_training("moe", 2, sequence_parallel=True)
    assert kinds(plan)["reduce_scatter"] >= 4 and plan.ctx.sequence_split


def test_reference_moe_over_processes(pools):
    pools(2).run(train_and_compare, "moe", 2)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_grouped_experts_are_split_inside(name):
    pytest.importorskip("transformers")
    model, ids, labels = hf_family(name)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (ids,), {"labels": labels}, loss_fn=hf_loss)
    stacked = {k: v for k, v in plan.ctx.param_placements.items() if k.endswith(("gate_up_proj", "down_proj"))
               and "experts" in k}
    # (experts, 2 x hidden, dim) by output features, gate and up each split; (experts, dim, hidden) by input
    assert len(stacked) == 4, stacked
    for k, p in stacked.items():
        want = 1 if k.endswith("gate_up_proj") else 2
        assert isinstance(p, Shard) and p.dim == want and p.is_partition, (k, p)
    assert kinds(plan)["all_reduce"] == 1 + 2 * 2, kinds(plan)
    # the experts' input gradient is summed over the ranks once per token, not once per routed
    # slot: no backward all-reduce is larger than the hidden states
    hidden = ids.numel() * model.config.hidden_size
    copies = [n.meta[COMM] for n in plan.graph_module.graph.nodes if COMM in n.meta and n.meta[COMM].kind == "copy_to_tp"]
    assert copies and max(c.elements for c in copies) <= hidden, [c.elements for c in copies]
    loss, grads = plan.simulate_train(None, ids, labels=labels)
    ref = model(ids, labels=labels)
    ref.loss.backward()
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    for pname, p in model.named_parameters():
        assert (grads[pname] - p.grad).abs().max() < 1e-5, pname


def test_memory_counts_a_balanced_router():
    model, args = build("moe")
    sizes = data_dependent_sizes(capture(model, args).gm)
    # 2 x 16 tokens, top-2 of 4 experts: 16 routed rows per expert, in each of the 2 layers
    assert sorted(sizes.values()) == [16] * 8
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    assert "~" in plan.summary()  # bytes at that load are marked as estimates
    # with symbolic sizes the load is an expression in them: the same number at the same sizes
    dyn = fxpar.compile(model, fxpar.Mesh(tp=2), args, dynamic_shapes={"tokens": {0: "batch", 1: "seq"}})
    assert dyn.memory(batch=2, seq=16)[0].peak == plan.memory()[0].peak
    assert dyn.memory(batch=4, seq=16)[0].peak > plan.memory()[0].peak


def test_pipeline_cuts_never_send_a_value_sized_at_run_time():
    plan = check_pipeline("moe", 1, 2, 1, "1f1b", 2)
    spec = plan.ctx.pipeline
    nodes = {n.name: n for n in plan.graph_module.graph.nodes}
    crossing = [nodes[v] for s in spec.stages for v in s.outputs]
    assert crossing and all(all(isinstance(d, int) for d in n.meta["val"].shape) for n in crossing)
    model, args = build("moe")
    with pytest.raises(fxpar.FxparError, match="known only at run time"):
        fxpar.compile(model, fxpar.Mesh(pp=2), args, split_points=["layers.0.moe.experts.1"])


@pytest.mark.parametrize("sp", [False, True])
def test_every_value_and_gradient_checks_out_node_by_node(sp):
    model, args = build("moe")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, sequence_parallel=sp)
    # rows the experts picked carry each rank's part of their gradient until the all-reduce
    assert any(n.meta.get("fxpar_grad_partial") for n in plan.graph_module.graph.nodes)
    assert plan.check(*args, loss_fn=lambda out: out.float().pow(2).mean()) > 400
