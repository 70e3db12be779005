"""``offload="optimizer"`` (masters, gradients and optimizer state in host memory, stepped there)
and ``precision="fp16"`` (dynamic loss scaling): training equals the single-device model's, the
memory model separates device and host bytes and counts what a rank holds, and an overflow skips
the step on every rank."""

import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.ops.params import SHARDED
from tests.test_pipeline_distributed import train
from tests.test_pipeline_simulated import check_pipeline
from tests.test_zero import _held_bytes
from tests.zoo import adamw, loss_with_target, pipeline_case


@pytest.mark.parametrize("name, mesh, zero", [("gpt", (1, 1, 1), 0), ("gpt", (2, 1, 2), 1), ("llama", (2, 2, 1), 3),
                                              ("hf_llama", (2, 1, 1), 2)], ids=str)
def test_offloaded_training_equals_one_device(name, mesh, zero):
    plan = check_pipeline(name, *mesh, "1f1b", 2, zero=zero, offload="optimizer")
    assert plan.ctx.offloaded and all(m.offloaded and m.host for m in plan.memory())


@pytest.mark.parametrize("precision, zero", [("fp32", 0), ("fp32", 2), ("bf16", 1), ("bf16", 3)])
def test_memory_model_separates_device_and_host(precision, zero):
    """What rank 0 holds after a step, by place: on the device the weights the layers read, on
    the host the masters (apart from them even in fp32), their gradients and the optimizer
    state; per parameter the device keeps 4 (fp32) or 2 (bf16) bytes, or none under zero 3."""
    model, args, target = pipeline_case("llama", 4)
    d = 2
    plan = fxpar.compile(model, fxpar.Mesh(dp=d), args, microbatches=1, zero=zero, precision=precision,
                         offload="optimizer")
    mem = plan.memory()[0]
    held = plan.optimizer_params()[0]
    opt = adamw(held)
    plan.simulate_train(loss_with_target, *args, target=target)
    opt.step()
    assert all(SHARDED[p].host and SHARDED[p].full is not p for p in held if p in SHARDED)
    masters = sum(p.numel() * p.element_size() for p in held)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in held)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim())
    assert mem.host == masters + grads + state
    assert mem.params + mem.masters == _held_bytes(held)
    device = {"fp32": 4, "bf16": 2}[precision] if zero < 3 else 0
    assert mem.params / mem.weights == pytest.approx(device, rel=0.02)
    assert mem.static == mem.params + mem.buffers
    assert "on the host" in plan.summary()


def test_offload_is_checked():
    model, args, _ = pipeline_case("gpt", 2)
    with pytest.raises(fxpar.FxparError, match="offload="):
        fxpar.compile(model, fxpar.Mesh(dp=2), args, offload="params")


# over gloo ---------------------------------------------------------------------------------------
def test_offloaded_training_over_gloo(pools):
    pools(4).run(train, "llama", 2, 1, 2, "1f1b", 2, zero=1, offload="optimizer")


def _fp16(first_scale):
    """20 AdamW steps at dp=2 x tp=2 in fp16 beside the fp32 single-device run; the first step's
    scale ``first_scale``. Returns the losses' largest relative gap, the steps skipped, the scale
    at the end, and whether the skipped step left the weights as they were."""
    model, args, target = pipeline_case("gpt", 4)
    ref = copy.deepcopy(model)
    mesh = fxpar.Mesh(dp=2, tp=2)
    dp = mesh.coordinate(dist.get_rank())["dp"]
    local, local_target = tuple(a.chunk(2)[dp] for a in args), target.chunk(2)[dp]
    pm = fxpar.parallelize(model, mesh, example_args=local, loss_fn=loss_with_target, microbatches=2,
                           precision="fp16")
    opt, ropt = adamw(pm.parameters()), adamw(ref.parameters())
    assert {p.dtype for p in pm.parameters()} == {torch.float32}
    pm.loss_scaler.scale = first_scale
    gaps, unchanged = [], None
    for step in range(20):
        before = [p.detach().clone() for p in pm.parameters()]
        loss = pm.train_step(*local, target=local_target)
        opt.step()
        opt.zero_grad()
        if pm.loss_scaler.last_skipped:
            unchanged = all(torch.equal(a, p) for a, p in zip(before, pm.parameters()))
            continue
        expect = loss_with_target(ref(*args), target)
        expect.backward()
        ropt.step()
        ropt.zero_grad()
        gaps.append(abs(loss.item() - expect.item()) / expect.item())
    pm.train_step(*local, target=local_target)
    if not pm.loss_scaler.last_skipped:  # its gradients are there: another step onto them is refused
        with pytest.raises(fxpar.FxparError, match="zero_grad"):
            pm.train_step(*local, target=local_target)
    return max(gaps), pm.loss_scaler.skipped, pm.loss_scaler.scale, unchanged


def test_fp16_with_loss_scaling_over_gloo(pools):
    # the default scale (2**16) trains without overflow here; 2**28 overflows the fp16 gradients
    # until it has halved enough, and those steps are skipped on every rank
    for gap, skipped, scale, _ in pools(4).run(_fp16, 2.0**16):
        assert gap < 2e-2 and skipped == 0 and scale == 2.0**16
    results = pools(4).run(_fp16, 2.0**28)
    assert len({(s, sc) for _, s, sc, _ in results}) == 1  # the ranks agree on every skip
    for gap, skipped, scale, unchanged in results:
        assert gap < 2e-2 and 0 < skipped < 15 and scale == 2.0 ** (28 - skipped) and unchanged
