"""Dropout under tensor parallelism: replicated regions draw the same mask on every rank; sharded
regions draw per rank (Megatron), or, with rng="exact", exactly the single-device masks."""

import warnings

import pytest
import torch

import fxpar
from fxpar.metadata import PLACEMENT, RNG
from fxpar.placement import Shard
from fxpar.simulate import Recorder, run_ranks
from fxpar.models import gpt
from tests.zoo import assert_close, loss_fn


def _model():
    torch.manual_seed(0)
    return gpt.build(dropout=0.2, flash=False)  # attention dropout is then an explicit op on heads


def trains_with_the_same_masks(plan, model, idx):
    """Loss and every gradient of one step from the same seed equal the single-device model's."""
    torch.manual_seed(42)
    ref = model(idx)
    loss_fn(ref).backward()
    torch.manual_seed(42)
    loss, grads = plan.simulate_train(loss_fn, idx)
    assert_close(loss, loss_fn(ref), "loss with dropout")
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name} with dropout")


def test_exact_mode_reproduces_single_device_dropout():
    model, (idx,) = _model()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), rng="exact")
    streams = {n.meta[RNG] for n in plan.graph_module.graph.nodes if RNG in n.meta}
    assert streams == {"replicated", "sharded"}
    trains_with_the_same_masks(plan, model, idx)
    # the default generator advanced as in the single-device run: the next masks agree too
    torch.manual_seed(5)
    a = model(idx)
    torch.manual_seed(5)
    b = plan.simulate(idx)
    assert_close(b, a, "second call")


def _record(plan, idx):
    mods = [plan.rank_module(r) for r in range(plan.tp)]

    def rec(r):
        recorder = Recorder(mods[r])
        recorder.run(idx)
        return recorder.values

    return run_ranks(rec, plan._contexts())


def test_megatron_mode_same_mask_when_replicated_own_mask_when_sharded():
    model, (idx,) = _model()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,))
    torch.manual_seed(3)
    values = _record(plan, idx)
    nodes = [n for n in plan.graph_module.graph.nodes if RNG in n.meta]
    replicated = [n for n in nodes if n.meta[RNG] == "replicated"]
    sharded = [n for n in nodes if n.meta[RNG] == "sharded"]
    assert replicated and sharded
    for n in replicated:
        torch.testing.assert_close(values[0][n.name], values[1][n.name], rtol=0, atol=0)
    torch.manual_seed(3)
    exact = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), rng="exact")
    exact_values = _record(exact, idx)
    for n in sharded:
        assert isinstance(n.meta[PLACEMENT], Shard)
        # zeros where dropped: each rank drew its own mask, not the slice of the single-device one
        kept = [(values[r][n.name] != 0) for r in range(2)]
        kept_exact = [(exact_values[r][n.name] != 0) for r in range(2)]
        assert any(not torch.equal(a, b) for a, b in zip(kept, kept_exact))


def test_exact_mode_warns_about_dropout_inside_attention():
    torch.manual_seed(0)
    model, (idx,) = gpt.build(dropout=0.2)  # flash: dropout inside scaled_dot_product_attention
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), rng="exact")
    assert any("inside scaled_dot_product_attention" in w for w in plan.ctx.warnings)


def _different_seeds():
    import torch.distributed as dist

    model, (idx,) = _model()
    torch.manual_seed(100 + dist.get_rank())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,))
    return [str(w.message) for w in caught]


def test_ranks_with_different_random_states_are_warned(pools):
    for caught in pools(2).run(_different_seeds):
        assert any("different random states" in m for m in caught), caught


@pytest.mark.parametrize("mode", ["megatron", "exact"])
def test_eval_mode_has_no_dropout(mode):
    model, (idx,) = _model()
    model.eval()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), rng=mode)
    assert_close(plan.simulate(idx), model(idx), "eval output")
