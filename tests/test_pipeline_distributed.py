"""Pipeline, data and tensor parallelism over gloo processes: each rank trains its replica's part
of the batch with ``train_step``; the loss, what each rank holds of every gradient and the weights
after 3 AdamW steps equal the single-device model trained on the whole batch."""

import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from tests.zoo import adamw, assert_close, logits, loss_with_target, pipeline_case

STEPS = 3


def train(name, dp, pp, tp, schedule, m, **options):
    """Train with ``train_step`` beside the single-device model; every rank's gradients (its
    shards, ``pm.local_shard``), the gradient norm ``pm.clip_grad_norm_`` finds, the weights and
    inference match. Returns how many parameters this rank holds."""
    model, args, target = pipeline_case(name, dp * m)
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters())
    mesh = fxpar.Mesh(dp=dp, pp=pp, tp=tp)
    coord = mesh.coordinate(dist.get_rank())
    local = tuple(a.chunk(dp, 0)[coord["dp"]] for a in args)
    local_target = target.chunk(dp, 0)[coord["dp"]]
    pm = fxpar.parallelize(model, mesh, example_args=local, loss_fn=loss_with_target, schedule=schedule, microbatches=m,
                           **options)
    params = dict(pm.named_parameters())
    opt = adamw(params.values()) if params else None  # a rank may hold no weights
    for step in range(STEPS):
        ref_loss = loss_with_target(ref(*args), target)
        ref_loss.backward()
        loss = pm.train_step(*local, target=local_target)
        assert_close(loss, ref_loss.detach(), f"rank {dist.get_rank()} loss at step {step}")
        for pname, p in ref.named_parameters():
            if pname in params:
                expect = pm.local_shard(pname, p.grad)
                assert_close(params[pname].grad, expect, f"rank {dist.get_rank()} step {step} gradient of {pname}")
        norm = pm.clip_grad_norm_(1e9)
        assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9), f"gradient norm at step {step}",
                     rtol=1e-4)
        if opt is not None:
            opt.step()
            opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    full = pm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, f"{key} after {STEPS} steps")
    pm.eval()
    with torch.no_grad():
        assert_close(logits(pm(*local)), logits(ref.eval()(*local)), "inference on every rank")
    return len(params)


# every model on every mesh, the schedules taking turns (each mesh runs each schedule once)
MODELS = ["gpt", "llama", "mlp", "hf_gpt2", "hf_llama"]
MESHES = [(1, 2, 1), (1, 4, 1), (1, 2, 2), (2, 2, 1)]  # dp, pp, tp
SCHEDULES = ["gpipe", "1f1b", "interleaved", "zbh1", "zbv"]
CASES = [(name, dp, pp, tp, SCHEDULES[(i + j) % 5], 4 if pp == 4 else 2)
         for i, name in enumerate(MODELS) for j, (dp, pp, tp) in enumerate(MESHES)]



@pytest.mark.parametrize("name, dp, pp, tp, schedule, m", CASES, ids=lambda x: str(x))
def test_pipelines(pools, name, dp, pp, tp, schedule, m):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    pools(dp * pp * tp).run(train, name, dp, pp, tp, schedule, m)


def _train_in_forward():
    model, args, target = pipeline_case("gpt", 2)
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=args, loss_fn=loss_with_target, microbatches=2)
    try:
        pm(*args)
    except fxpar.FxparError as e:
        return str(e)
    return "no error"


def test_pipelined_module_trains_through_train_step(pools):
    for msg in pools(2).run(_train_in_forward):
        assert "pm.train_step(*args, target=...)" in msg


def test_train_step_without_stages(pools):
    """The same call with tensor parallelism only: microbatches, one stage, no pipeline sends."""
    pools(2).run(train, "llama", 1, 1, 2, "1f1b", 2)


def _messages_in_order():
    """Tags ignored, as NCCL ignores them: receives must be posted in the order peers send."""
    from tests.test_stages import LongSkip

    torch.manual_seed(0)
    model, x = LongSkip(), torch.randn(8, 16)
    ref = copy.deepcopy(model)
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=(x,), loss_fn=lambda out: out.pow(2).mean(),
                           schedule="interleaved", microbatches=2)
    pm._p2p.order_only = True
    loss = pm.train_step(x)
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    assert_close(loss, ref_loss.detach(), "loss with order-matched messages")
    for name, p in pm.named_parameters():
        assert_close(p.grad, dict(ref.named_parameters())[name].grad, f"gradient of {name}")


def test_messages_match_by_order_not_tag(pools):
    pools(2).run(_messages_in_order)
