"""Context parallelism: the sequence split over the cp ranks for every layer, Ulysses attention.

The core test as everywhere: outputs, every gradient and the weights after three AdamW steps
equal the single-device model's, in one process and over gloo, alone and with tensor
parallelism; then what it moves, what it stores per rank, and the errors.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import fxpar
from fxpar.errors import FxparError, PlanError
from fxpar.metadata import COMM
from tests.test_equivalence_distributed import train_and_compare
from tests.test_memory import estimated_activations, measured_activations
from tests.test_equivalence_simulated import check_training
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import assert_close, build


def kinds(plan) -> Counter:
    return Counter((n.meta[COMM].kind, n.meta[COMM].group) for n in plan.graph_module.graph.nodes if COMM in n.meta)


@pytest.mark.parametrize(
    "mesh", [dict(cp=2), dict(cp=4), dict(cp=2, tp=2)], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items())
)
def test_llama_with_causal_attention_and_rope(mesh):
    plan = check_training("llama", mesh=fxpar.Mesh(**mesh))
    layers = 2
    got = kinds(plan)
    # Ulysses: q, k, v to head-split and the output back, per layer; nothing gathers a sequence
    # but the logits the model returns
    assert got[("all_to_all", "cp")] == 4 * layers
    assert got[("all_gather", "cp")] == 1
    assert not plan.ctx.warnings


@pytest.mark.parametrize(
    "mesh", [dict(cp=2), dict(cp=2, tp=2)], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items())
)
def test_gpt_with_learned_positions(mesh):
    check_training("gpt", mesh=fxpar.Mesh(**mesh))


@pytest.mark.parametrize("name", ["hf_llama", "hf_gpt2"])
def test_hugging_face(name):
    """Their own masks, position ids and attention paths, unchanged."""
    pytest.importorskip("transformers")
    plan = check_training(name, mesh=fxpar.Mesh(cp=2))
    assert kinds(plan)[("all_to_all", "cp")] == 8


def test_written_out_attention_gathers_keys_and_values():
    """``softmax(q @ k.T) @ v`` is not one attention op: each rank keeps its queries' rows and
    gathers the keys and values (all-gather context parallelism), still exact."""
    plan = check_training("gpt_matmul", mesh=fxpar.Mesh(cp=2))
    assert kinds(plan)[("all_to_all", "cp")] == 0


@pytest.mark.parametrize("tp", [1, 2])
def test_over_gloo(pools, tp):
    mesh = fxpar.Mesh(cp=2, tp=tp)
    counts = pools(mesh.size).run(train_and_compare, "llama", tp, mesh)
    assert len(set(counts)) == 1


def test_with_pipeline_and_replicas():
    check_pipeline("llama", 2, 2, 1, "1f1b", 2, cp=2)


def test_all_to_all_bytes():
    """Each all-to-all sends ``(cp-1)/cp`` of the rank's own ``1/cp`` of q, k, v or the output."""
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), args)
    for node in plan.graph_module.graph.nodes:
        info = node.meta.get(COMM)
        if info is not None and info.kind == "all_to_all":
            local = node.meta["val"].numel() * node.meta["val"].element_size()
            assert info.bytes == info.bwd_bytes == local // 2
    text = plan.summary()
    assert "cp all_to_all" in text and "cp copy_to_tp" in text and "Ulysses" in text


def test_activations_per_rank_drop_with_cp():
    model, args = build("llama")
    args = (torch.randint(0, 256, (2, 64)),)
    one = fxpar.compile(model, fxpar.Mesh(tp=1), args)
    two = fxpar.compile(model, fxpar.Mesh(cp=2), args)
    a1, a2 = estimated_activations(one), estimated_activations(two)
    assert a2 < 0.6 * a1, (a1, a2)
    assert set(measured_activations(two, args)) == {a2}


def test_sequence_not_divisible():
    model, _ = build("llama")
    with pytest.raises(
        PlanError,
        match=r"input 'tokens', shape \(2, 6\)\) evenly over cp=4 ranks: use a sequence length divisible by 4",
    ):
        fxpar.compile(model, fxpar.Mesh(cp=4), (torch.randint(0, 256, (2, 6)),))


def test_symbolic_sequence():
    model, args = build("llama")
    with pytest.raises(PlanError, match="fixed sequence length"):
        fxpar.compile(model, fxpar.Mesh(cp=2), args, dynamic_shapes={"tokens": {1: "seq"}})


def test_no_sequence_to_split():
    model, args = build("mlp")
    with pytest.raises(PlanError, match="no input has one"):
        fxpar.compile(model, fxpar.Mesh(cp=2), args)


def test_check_refuses_cp():
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), args)
    with pytest.raises(FxparError, match="one cp rank's program"):
        plan.check(*args)


class _Dropped(torch.nn.Module):
    """Dropout on a value split over cp (the embeddings) and on one every cp rank holds whole
    (a summary of the sequence)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 64)
        self.lin = torch.nn.Linear(64, 64)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, ids):
        h = self.drop(self.emb(ids))
        s = self.drop(self.lin(h.mean(1)))
        return h + s[:, None]


def test_dropout_masks_over_cp():
    """Each cp rank holds other positions: the same stream would give them the same masks. A
    value they all hold whole must get the same mask on all of them, or their copies of the
    weights reading it would get different gradients and drift apart."""
    model = _Dropped().train()
    ids = torch.zeros(1, 8, dtype=torch.long)  # every position the same row: only the mask differs
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), (ids,))
    out = plan.simulate(ids)
    emb = out - out[:, :1]  # the summary term is the same at every position: what is left is h
    assert not torch.equal(emb[0, :4] != 0, emb[0, 4:] != 0)
    plan.simulate_train(lambda o: o.square().mean(), ids)
    grads = [{n: p.grad for n, p in plan.rank_module(r).named_parameters()} for r in range(2)]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"cp ranks' gradients of {name} differ"
    with pytest.raises(PlanError, match="rng='exact'"):
        fxpar.compile(model, fxpar.Mesh(cp=2), (ids,), rng="exact")


def test_symbolic_batch():
    """A batch size known only at run time: the sequence split stays static, memory is a formula."""
    model, args = build("llama")
    plan = fxpar.compile(model, fxpar.Mesh(cp=2), args, dynamic_shapes={"tokens": {0: "batch"}})
    x = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        assert_close(plan.simulate(x), model(x), "batch of 3")
    small, large = (plan.memory(batch=b)[0].peak for b in (2, 8))
    assert large > small


def test_loss_in_the_graph_with_ignored_targets():
    """A mean cross-entropy captured with the model (ignored targets, label smoothing) stays on
    each rank's tokens: a sum over the count of targets, no gathered logits."""
    import torch.nn.functional as F

    def loss(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten(), ignore_index=0, label_smoothing=0.1)

    model, args = build("llama")
    target = torch.randint(0, 4, args[0].shape, generator=torch.Generator().manual_seed(5))  # many ignored
    ref = loss(model(*args), target)
    ref.backward()
    plan = fxpar.compile(model, fxpar.Mesh(cp=2, tp=2), args, loss_fn=loss, example_target=target)
    got, grads = plan.simulate_train(None, *args, target=target)
    assert_close(got, ref.detach(), "loss")
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name}")
    assert not plan.ctx.warnings
    assert kinds(plan)[("all_gather", "cp")] == 0  # the logits stay split


def test_sequence_parallel_without_tp_says_cp_splits_already():
    model, args = build("llama")
    with pytest.raises(ValueError, match="cp already splits the whole sequence"):
        fxpar.compile(model, fxpar.Mesh(cp=2), args, sequence_parallel=True)
