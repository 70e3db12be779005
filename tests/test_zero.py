"""State sharding over the data-parallel ranks (``zero=1|2|3``): losses, gradients and weights after
3 AdamW steps equal the single-device model's, in one process and over gloo; each rank holds
its share of the optimizer state (and of the gradients and weights at zero 2 and 3); the memory
model counts what the ranks hold; checkpoints move between zero stages and meshes."""

import copy

import pytest
import torch

import fxpar
from fxpar.ops.params import SHARDED, SavedGathers, row_split
from fxpar.runtime import pipeline
from tests.test_pipeline_simulated import check_pipeline
from tests.test_pipeline_distributed import train
from tests.zoo import adamw, assert_close, logits, loss_with_target, pipeline_case

MESHES = [(2, 1, 1), (2, 1, 2), (2, 2, 1)]  # dp, pp, tp


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("dp, pp, tp", MESHES, ids=str)
@pytest.mark.parametrize("name", ["gpt", "llama", "mlp", "moe", "hf_gpt2", "hf_llama"])
def test_simulated_training(name, dp, pp, tp, zero):
    """Losses, every gradient and the weights after 3 AdamW steps, and inference, equal the
    single-device model's: the reference models and two Hugging Face families at every mesh."""
    plan = check_pipeline(name, dp, pp, tp, "1f1b", 2, zero=zero)
    assert plan.ctx.zero_rows and "gather_weights" in plan.ctx.passes


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
    assert SavedGathers._live and all(ref.expired() for ref, *_ in SavedGathers._live.values())
    loss, grads = plan.simulate_train(loss_with_target, *args, target=target)
    loss_with_target(model(*args), target).backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name}")


def _held_bytes(params) -> int:
    """Bytes of the distinct storages of the weights a rank holds: the parameters (masters, rows)
    and the whole weights the layers read (``Sharded.full``)."""
    storages = {}
    for p in params:
        entry = SHARDED.get(p)
        for t in (p, entry.full if entry is not None else None):
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_model_counts_what_a_rank_holds(precision, monkeypatch):
    """The estimate of rank 0 (which holds the most rows) equals what it holds after a step, by
    category, and the bytes per parameter are ZeRO's and Megatron's: fp32 4 + 4 + 8 without
    zero, 4 + 4 + 8/d at zero 1, 4 + (4 + 8)/d at 2, 16/d at 3; bf16 2 + 4 + 4 + 8 = 18, then
    Megatron's distributed optimizer's 6 + 12/d at zero 1, 2 + 16/d at 2, 16/d at 3."""
    model, args, target = pipeline_case("llama", 4)
    d = 4
    expect = {"fp32": {0: 16, 1: 8 + 8 / d, 2: 4 + 12 / d, 3: 16 / d},
              "bf16": {0: 18, 1: 6 + 12 / d, 2: 2 + 16 / d, 3: 16 / d}}[precision]
    whole_grads = {}  # zero 1: the whole gradients a step sums before reducing them into the rows
    finish = pipeline.finish_rows

    def measured_finish(params, comm):
        for p in params.values():
            entry = SHARDED.get(p)
            if entry is not None and entry.full_grad is not None:
                whole_grads[id(p)] = entry.full_grad.numel() * entry.full_grad.element_size()
        finish(params, comm)

    monkeypatch.setattr(pipeline, "finish_rows", measured_finish)
    for zero in (0, 1, 2, 3):
        plan = fxpar.compile(model, fxpar.Mesh(dp=d), args, microbatches=1, zero=zero, precision=precision)
        mem = plan.memory()[0]
        held = plan.optimizer_params()[0]
        opt = adamw(held)
        whole_grads.clear()
        plan.simulate_train(loss_with_target, *args, target=target)
        opt.step()
        assert mem.params + mem.masters == _held_bytes(held), f"zero {zero}: weights"
        grads = sum(whole_grads.get(id(p), p.grad.numel() * p.grad.element_size()) for p in held)
        assert mem.grads == grads, f"zero {zero}: gradients"
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim())
        assert mem.optimizer == state, f"zero {zero}: optimizer state"
        per_param = (mem.params + mem.masters + mem.grads + mem.optimizer) / mem.weights
        assert per_param == pytest.approx(expect[zero], rel=0.02), f"zero {zero}"


def test_bf16_trains_from_fp32_masters_and_tracks_the_fp32_run():
    """20 AdamW steps at dp=2 x tp=2, zero 1: the optimizer steps fp32 masters, the layers compute
    in bf16, and the loss stays within 1% of the single-device fp32 run's."""
    model, args, target = pipeline_case("gpt", 4)
    ref = copy.deepcopy(model)
    plan = fxpar.compile(model, fxpar.Mesh(dp=2, tp=2), args, microbatches=2, zero=1, precision="bf16")
    opts = [adamw(ps) for ps in plan.optimizer_params()]
    assert {p.dtype for ps in plan.optimizer_params() for p in ps} == {torch.float32}
    ropt = adamw(ref.parameters())
    for step in range(20):
        loss, grads = plan.simulate_train(loss_with_target, *args, target=target)
        expect = loss_with_target(ref(*args), target)
        expect.backward()
        assert abs(loss.item() - expect.item()) <= 1e-2 * expect.item(), f"step {step}: {loss.item()} vs {expect.item()}"
        assert all(g.dtype == torch.float32 for g in grads.values())
        for o in [*opts, ropt]:
            o.step()
            o.zero_grad()
    with torch.no_grad():
        assert logits(plan.simulate(*args)).dtype == torch.bfloat16


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
                                              ("hf_llama", (2, 1, 2), 3), ("hf_gpt2", (2, 2, 1), 2), ("llama", (2, 2, 1), 1),
                                              ("mlp", (2, 1, 1), 3)], ids=str)
def test_training_over_gloo(pools, name, mesh, zero):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    pools(mesh[0] * mesh[1] * mesh[2]).run(train, name, *mesh, "1f1b", 2, zero=zero)


def _train_bf16(zero):
    import torch.distributed as dist

    model, args, target = pipeline_case("llama", 4)
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters())
    mesh = fxpar.Mesh(dp=2, tp=2)
    dp = mesh.coordinate(dist.get_rank())["dp"]
    local, local_target = tuple(a.chunk(2)[dp] for a in args), target.chunk(2)[dp]
    pm = fxpar.parallelize(model, mesh, example_args=local, loss_fn=loss_with_target, microbatches=2, zero=zero,
                           precision="bf16")
    opt = adamw(pm.parameters())
    assert {p.dtype for p in pm.parameters()} == {torch.float32}
    for step in range(8):
        loss = pm.train_step(*local, target=local_target)
        expect = loss_with_target(ref(*args), target)
        expect.backward()
        assert abs(loss.item() - expect.item()) <= 1e-2 * expect.item(), f"step {step}"
        pm.clip_grad_norm_(1.0)
        for o in (opt, ropt):
            o.step()
            o.zero_grad()
    full = pm.full_state_dict()
    return max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("zero", [0, 3])
def test_bf16_over_gloo(pools, zero):
    drift = pools(4).run(_train_bf16, zero)
    # the fp32 masters stay near the fp32 run's weights: Adam moves each by at most about lr a step,
    # whichever sign bf16's rounding gives a gradient near zero
    assert max(drift) < 2 * 8 * 1e-3


def test_zero3_gathers_each_layer_once_and_prefetches_the_next(monkeypatch):
    """A forward gathers each layer's weights in one collective, begun while the layer before it
    computes (every prefetch is used); a backward gathers each layer again in one; the listing
    names what each gather prefetches."""
    from fxpar.ops import params

    model, args, target = pipeline_case("llama", 2)
    plan = fxpar.compile(model, fxpar.Mesh(dp=2), args, microbatches=1, zero=3)
    gathers = [n for n in plan.graph_module.graph.nodes if n.target is params.gather_params]
    assert len(gathers) == 5  # embedding, 2 layers, norm, output
    started = []
    begin = params.gather_rows_start
    monkeypatch.setattr(params, "gather_rows_start", lambda *a: started.append(len(a[0])) or begin(*a))
    plan.simulate(*args)
    assert len(started) == 2 * len(gathers) and not params._PREFETCHED  # 2 ranks, each prefetch used
    started.clear()
    plan.simulate_train(loss_with_target, *args, target=target)
    assert len(started) == 2 * 2 * len(gathers) and not params._PREFETCHED
    assert "prefetch=[" in plan.rank_code(0)
