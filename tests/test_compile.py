"""``fxpar.parallelize(..., compile=True)``: every rank's programs run through ``torch.compile``
(inductor) and train to the same numbers as the single-device model."""

import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.shards import shard_tensor
from tests.zoo import adamw, assert_close, loss_with_target, pipeline_case

STEPS = 2


def train_compiled(mesh: dict, compile) -> int:
    model, args, target = pipeline_case("gpt", 2)
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters())
    m = fxpar.Mesh(**mesh)
    tp = m.coordinate(dist.get_rank())["tp"]
    pm = fxpar.parallelize(model, m, example_args=args, loss_fn=loss_with_target, example_target=target,
                           microbatches=2, compile=compile)
    opt = adamw(pm.parameters())
    params = dict(pm.named_parameters())
    for step in range(STEPS):
        ref_loss = loss_with_target(ref(*args), target)
        ref_loss.backward()
        loss = pm.train_step(*args, target=target)
        assert_close(loss, ref_loss.detach(), f"{mesh} loss at step {step}")
        for name, p in ref.named_parameters():
            if name in params:
                assert_close(params[name].grad, shard_tensor(p.grad, pm.placement_of(name), tp), f"{mesh} gradient of {name}")
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    compiled = [p for p in pm._programs.values()]
    mods = [p.full for p in compiled if p.full is not None] + [s for p in compiled for s in p.stages.values()]
    return sum(isinstance(x, torch._dynamo.eval_frame.OptimizedModule) for x in mods)


@pytest.mark.parametrize("mesh", [dict(tp=2), dict(pp=2)], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_compiled_programs_train_like_the_model(pools, mesh):
    counts = pools(2).run(train_compiled, mesh, True)
    assert all(c > 0 for c in counts), "the programs were not compiled"


def _losses(compile, steps: int = 4, **options) -> list[float]:
    model, args, target = pipeline_case("llama", 2)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args, loss_fn=loss_with_target, example_target=target,
                           compile=compile, **options)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        losses.append(pm.train_step(*args, target=target).item())
        opt.step()
        opt.zero_grad()
    return losses


def test_compiled_programs_read_the_weights_each_step_made(pools):
    """The gathers that make a layer's weights from the masters run outside the compiled graph:
    traced, they would keep the first step's weights (the check that the optimizer changed the
    masters folded away) and the losses would part from the uncompiled run's."""
    for compiled, plain in zip(pools(2).run(_losses, True, precision="bf16"), pools(2).run(_losses, False, precision="bf16")):
        assert max(abs(a - b) / b for a, b in zip(compiled, plain)) < 1e-3, (compiled, plain)


def test_a_wrong_compile_option_is_refused():
    with pytest.raises(fxpar.FxparError, match="compile= takes"):
        fxpar.runtime.module._compile_options("max-autotune")
