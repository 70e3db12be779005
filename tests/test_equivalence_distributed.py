"""The core test over real processes (gloo): what each rank holds of the outputs, of every
parameter gradient and of the weights after 3 AdamW steps equals the single-device model."""

import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.shards import shard_tensor
from tests.zoo import adamw, assert_close, build, loss_fn, reference_steps

STEPS, LR = 3, 1e-3


def train_and_compare(name: str, tp: int, mesh=None, **options) -> int:
    """Train ``name`` on ``mesh`` (default ``Mesh(tp=tp)``) for a few steps on this rank; outputs,
    this rank's gradient shards and the final weights must be the single-device model's."""
    mesh = mesh or fxpar.Mesh(tp=tp)
    rank = mesh.coordinate(dist.get_rank())["tp"]
    model, args = build(name)
    out_ref = model(*args)
    losses, grads, state = reference_steps(model, args, STEPS, LR)
    pm = fxpar.parallelize(model, mesh, example_args=args, timeout=_timeout(), **options)
    opt = adamw(pm.parameters(), lr=LR)
    params = dict(pm.named_parameters())
    for step in range(STEPS):
        out = pm(*args)
        if step == 0:
            assert type(out) is type(out_ref)
            assert_close(getattr(out, "logits", out), getattr(out_ref, "logits", out_ref), f"rank {rank} output")
        loss = loss_fn(out)
        loss.backward()
        assert_close(loss.detach(), losses[step], f"rank {rank} loss at step {step}")
        for pname, g in grads[step].items():
            place = pm.placement_of(pname)
            assert_close(params[pname].grad, shard_tensor(g, place, rank), f"rank {rank} step {step} gradient of {pname}")
        opt.step()
        opt.zero_grad()
    full = pm.full_state_dict()
    assert set(full) == set(state)
    for key, value in state.items():
        assert_close(full[key], value, f"rank {rank} {key} after {STEPS} steps")
    return len(params)


def _timeout():
    import datetime

    return datetime.timedelta(seconds=60)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt", "llama", "mlp"])
def test_reference_models(pools, name, tp):
    counts = pools(tp).run(train_and_compare, name, tp)
    assert len(set(counts)) == 1


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_hugging_face(pools, name):
    pytest.importorskip("transformers")
    pools(2).run(train_and_compare, name, 2)


def test_one_liner_captures_at_first_call(pools):
    pools(2).run(_one_liner)


def _one_liner():
    model, args = build("gpt")
    ref = model(*args)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2))
    try:
        list(pm.parameters())
        raise AssertionError("parameters() before the first call should raise")
    except fxpar.FxparError as e:
        assert "first call" in str(e)
    assert_close(pm(*args), ref, "one-liner output")
    # a new batch size is captured again with the same parameters
    idx = torch.randint(0, 256, (3, 16))
    assert_close(pm(idx), model(idx), "output at a new batch size")
    assert len(pm.plans) == 2
    pm.eval()
    assert_close(pm(*args), model.eval()(*args), "output in eval mode")


def test_device_mesh_and_symbolic_shapes(pools):
    pools(2).run(_device_mesh_dynamic)


def _device_mesh_dynamic():
    from torch.distributed.device_mesh import init_device_mesh

    model, args = build("gpt")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    pm = fxpar.parallelize(model, mesh, example_args=args, dynamic_shapes={"idx": {0: "batch", 1: "seq"}})
    for b, t in ((2, 16), (3, 7), (1, 33)):
        idx = torch.randint(0, 256, (b, t))
        assert_close(pm(idx), model(idx), f"batch {b} seq {t}")
    assert len(pm.plans) == 1  # one program serves every batch and sequence size


@pytest.mark.parametrize("name,tp", [("gpt", 2), ("llama", 4)])  # llama at tp=4: kv heads shared by 2 ranks
def test_clip_grad_norm_over_the_whole_model(pools, name, tp):
    pools(tp).run(_clip, name, tp)


def _clip(name, tp):
    model, args = build(name)
    ref = copy.deepcopy(model)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=tp))
    pm.zero_grad()  # before the first call: nothing to zero, no error
    loss_fn(pm(*args)).backward()
    loss_fn(ref(*args)).backward()
    norm = pm.clip_grad_norm_(0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert_close(norm, ref_norm.float(), "global gradient norm")
    rank = dist.get_rank()
    for name, p in ref.named_parameters():
        assert_close(dict(pm.named_parameters())[name].grad, shard_tensor(p.grad, pm.placement_of(name), rank), f"clipped {name}")


def test_ranks_with_different_weights_are_refused(pools):
    msgs = pools(2).run(_different_weights)
    assert all("hold different values" in m and "torch.manual_seed" in m for m in msgs), msgs


def _different_weights():
    model, args = build("mlp", seed=dist.get_rank())
    try:
        fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args)
    except fxpar.FxparError as e:
        return str(e)
    return "no error"
