"""State sharding over the data-parallel ranks (``zero=1|2|3``): losses, gradients and weights after
3 AdamW steps equal the single-device model's, in one process and over gloo; each rank holds
its share of the optimizer state (and of the gradients and weights at zero 2 and 3); the memory
model counts what the ranks hold; checkpoints move between zero stages and meshes."""

import pytest

import fxpar
from fxpar.ops.params import SavedGathers, row_split
from tests.test_pipeline_simulated import check_pipeline
from tests.test_pipeline_distributed import train
from tests.zoo import assert_close, loss_with_target, pipeline_case

MESHES = [(2, 1, 1), (2, 1, 2), (2, 2, 1)]  # dp, pp, tp


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("dp, pp, tp", MESHES, ids=str)
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_simulated_training(name, dp, pp, tp, zero):
    plan = check_pipeline(name, dp, pp, tp, "1f1b", 2, zero=zero)
    assert plan.ctx.zero_rows and "insert_gathers" in plan.ctx.passes


@pytest.mark.parametrize("name, zero, mesh", [("hf_gpt2", 1, (2, 1, 2)), ("hf_gpt2", 3, (2, 2, 1)),
                                              ("hf_llama", 2, (2, 1, 2)), ("hf_llama", 3, (2, 1, 2)),
                                              ("mlp", 3, (2, 1, 1))], ids=str)
def test_simulated_training_of_other_families(name, zero, mesh):
    check_pipeline(name, *mesh, "1f1b", 2, zero=zero)


def test_a_rank_steps_only_its_rows():
    model, args, _ = pipeline_case("gpt", 4)
    whole = sum(p.numel() for p in model.parameters())
    for zero in (0, 1, 3):
        plan = fxpar.compile(model, fxpar.Mesh(dp=2), args, microbatches=2, zero=zero)
        held = [sum(p.numel() for p in ps) for ps in plan.optimizer_params()]
        if zero == 0:
            assert held == [whole, whole]
        else:  # every weight split but the few smaller than dp
            assert sum(held) == whole and max(held) - min(held) < whole // 100


def test_zero3_frees_each_weight_after_its_layer():
    """After a zero-3 forward only the rows remain: every whole weight the forward gathered is
    freed, although autograd keeps what it needs to gather it again for backward."""
    model, args, target = pipeline_case("gpt", 2)
    plan = fxpar.compile(model, fxpar.Mesh(dp=2), args, microbatches=1, zero=3)
    kept = plan.simulate(*args)  # the graph of the forward lives as long as its output
    assert kept.requires_grad
    assert SavedGathers._live and all(ref.expired() for ref, _ in SavedGathers._live.values())
    loss, grads = plan.simulate_train(loss_with_target, *args, target=target)
    loss_with_target(model(*args), target).backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name}")


def test_memory_model_counts_the_shares():
    model, args, _ = pipeline_case("llama", 4)
    per_param = {}
    for zero in (0, 1, 2, 3):
        plan = fxpar.compile(model, fxpar.Mesh(dp=4), args, microbatches=1, zero=zero)
        mem = plan.memory()[0]
        per_param[zero] = (mem.params / mem.weights, mem.grads / mem.weights, mem.optimizer / mem.weights)
        held = plan.optimizer_params()[0]  # rank 0 holds the most rows
        rows = sum(p.numel() for p in held)
        state = 8 * rows  # AdamW: two fp32 states per element of the rows
        assert mem.optimizer == (state if zero else 8 * mem.weights)
        assert mem.params == 4 * (rows if zero == 3 else mem.weights)
        assert mem.grads == 4 * (rows if zero >= 2 else mem.weights)
    assert per_param[0] == (4, 4, 8)
    for zero, (p, g, o) in per_param.items():  # ZeRO's 4 + 4 + 8/d, 4 + (4 + 8)/d, (4 + 4 + 8)/d
        if zero:
            assert o == pytest.approx(8 / 4, rel=0.01)
            assert g == pytest.approx(4 if zero < 2 else 1, rel=0.01)
            assert p == pytest.approx(4 if zero < 3 else 1, rel=0.01)


def test_zero_is_checked():
    model, args, _ = pipeline_case("gpt", 2)
    for bad in (4, True, "1"):
        with pytest.raises(fxpar.FxparError, match="zero="):
            fxpar.compile(model, fxpar.Mesh(dp=2), args, zero=bad)


def test_row_split_is_balanced():
    assert row_split(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert row_split(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


# over gloo ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, mesh, zero", [("gpt", (2, 1, 2), 1), ("llama", (2, 1, 2), 2), ("gpt", (2, 2, 1), 3),
                                              ("hf_llama", (2, 1, 2), 3)], ids=str)
def test_training_over_gloo(pools, name, mesh, zero):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    pools(mesh[0] * mesh[1] * mesh[2]).run(train, name, *mesh, "1f1b", 2, zero=zero)
