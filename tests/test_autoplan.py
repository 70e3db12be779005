"""The cost model (``fxpar.estimate``) and the planner (``fxpar.autoplan``): estimates that move
the way they must, candidates that fit and divide, and ``parallelize(model, "auto")`` training
like one process."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fxpar
from fxpar import schedule as sched
from fxpar.devices import PROFILES, profile
from fxpar.models import gpt, llama
from tests.zoo import adamw, assert_close, loss_with_target


def _gpt(layers=4, batch=8):
    model, (idx,) = gpt.build(n_layer=layers, n_embd=64, n_head=4, block_size=32)
    tokens = torch.randint(0, 256, (batch, 32))
    return model, tokens


def test_step_time_is_the_sum_of_its_parts():
    model, tokens = _gpt()
    e = fxpar.estimate(model, fxpar.Mesh(dp=2, pp=2, tp=2), (tokens,), device="h100-80gb", microbatches=2)
    assert e.step_time == pytest.approx(sum(e.breakdown.values()))
    assert e.breakdown["compute"] > 0 and e.breakdown["comm tp"] > 0 and e.breakdown["bubble"] > 0
    assert e.breakdown["comm dp"] > 0 and e.breakdown["comm pp"] > 0
    assert 0 < e.mfu < 1 and e.tflops_per_device > 0 and e.peak_memory > 0


class _Wide(nn.Module):
    """Matmuls large enough that the roofline is their FLOPs."""

    def __init__(self, d=8192, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_compute_is_flops_over_the_matmul_peak():
    d, layers, tokens = 8192, 2, 8192
    with torch.device("meta"):
        model = _Wide(d, layers)
    x = torch.empty(tokens, d, device="meta", dtype=torch.bfloat16)
    e = fxpar.estimate(model.to(torch.bfloat16), fxpar.Mesh(), (x,), device="h100-80gb")
    h100 = profile("h100-80gb")
    flops = 3 * 2 * tokens * d * d * layers  # forward and a backward of twice its FLOPs
    assert e.breakdown["compute"] == pytest.approx(flops / (h100.peak("bf16") * h100.matmul_eff), rel=1e-6)
    assert e.model_flops == pytest.approx(flops)


def test_more_microbatches_shrink_the_bubble():
    model, tokens = _gpt(layers=4, batch=16)
    shares = []
    for m in (2, 4, 8, 16):
        e = fxpar.estimate(model, fxpar.Mesh(pp=4), (tokens,), device="h100-80gb", microbatches=m)
        shares.append(e.breakdown["bubble"] / e.step_time)
    assert all(a > b for a, b in zip(shares, shares[1:])), shares


def test_more_tp_less_memory():
    model, (tokens,) = llama.build(dim=256, n_layers=2, n_heads=8, n_kv_heads=8, multiple_of=64, max_seq_len=64)
    peaks = [fxpar.estimate(model, fxpar.Mesh(tp=tp), (tokens,), device="h100-80gb").peak_memory for tp in (1, 2, 4)]
    assert peaks[0] > peaks[1] > peaks[2], peaks


def test_a_dimension_across_nodes_uses_the_network():
    model, tokens = _gpt()
    inside = fxpar.estimate(model, fxpar.Mesh(tp=2), (tokens,), device="h100-80gb", gpus_per_node=8)
    across = fxpar.estimate(model, fxpar.Mesh(tp=2), (tokens,), device="h100-80gb", gpus_per_node=1)
    assert across.breakdown["comm tp"] > inside.breakdown["comm tp"]
    assert across.breakdown["compute"] == inside.breakdown["compute"]


def test_makespan_of_uniform_1f1b_is_the_formula():
    p, m, f, b = 4, 8, 1.0, 2.0
    assert sched.one_f_one_b(p, m).makespan(f, b) == pytest.approx((m + p - 1) * (f + b))
    # a slow stage sets the pace
    slow = sched.one_f_one_b(p, m).makespan([1.0, 1.0, 3.0, 1.0], [2.0, 2.0, 6.0, 2.0])
    assert slow >= m * 9.0


def test_device_profiles_are_complete():
    for name, p in PROFILES.items():
        assert p.peak("bf16") > 0 and p.memory > 0 and p.memory_bw > 0 and p.sources, name
    with pytest.raises(fxpar.OptionError, match="h100-80gb"):
        profile("h100")


def _llama(heads=4, kv=2, layers=4):
    model, (tokens,) = llama.build(dim=64, n_layers=layers, n_heads=heads, n_kv_heads=kv, max_seq_len=32)
    return model, tokens[:1, :16]


def test_autoplan_returns_only_what_fits_and_divides():
    model, sample = _llama(heads=4, kv=2)
    small = dataclasses.replace(profile("h100-80gb"), name="small", memory=2_000_000)
    found = fxpar.autoplan(model, world_size=8, device=small, global_batch=16, example_args=(sample,), verbose=False)
    assert found, found.rejected
    for c in found:
        assert c.estimate.peak_memory <= small.memory
        assert 4 % c.mesh.tp == 0 and c.mesh.size == 8
        assert 16 % (c.mesh.dp * c.options["microbatches"]) == 0
    assert [c.estimate.step_time for c in found] == sorted(c.estimate.step_time for c in found)
    assert any("tp=8" in why for _, why in found.rejected)
    report = found.report()
    assert str(found[0].mesh) in report and "set aside" in report


def test_autoplan_says_why_nothing_fits():
    model, sample = _llama()
    tiny = dataclasses.replace(profile("h100-80gb"), name="tiny", memory=1000)
    found = fxpar.autoplan(model, world_size=4, device=tiny, global_batch=4, example_args=(sample,), verbose=False)
    assert not found
    assert any("needs about" in why and "GiB per device" in why for _, why in found.rejected)


def test_autoplan_takes_one_sample():
    model, sample = _llama()
    with pytest.raises(fxpar.OptionError, match="ONE sample"):
        fxpar.autoplan(model, world_size=2, device="cpu", global_batch=4, example_args=(sample.expand(2, -1),))


def test_cli_plan_auto(capsys):
    from fxpar.cli import main

    assert main(["plan", "gpt", "--auto", "--world", "2", "--device", "cpu", "--batch", "4"]) == 0
    assert "autoplan on cpu" in capsys.readouterr().out


STEPS = 2


def _train_auto(**fixed):
    torch.manual_seed(0)
    model, _ = gpt.build(n_layer=2, n_embd=32, n_head=4, block_size=16)
    tokens = torch.randint(0, 256, (8, 16))
    target = torch.randint(0, 256, (8, 16))
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters())
    pm = fxpar.parallelize(model, "auto", example_args=(tokens,), loss_fn=loss_with_target, example_target=target,
                           **fixed)
    mesh = pm.mesh
    assert mesh.size == dist.get_world_size()
    part = mesh.replica(dist.get_rank())
    local, local_target = tokens.chunk(mesh.replicas)[part], target.chunk(mesh.replicas)[part]
    params = dict(pm.named_parameters())
    opt = adamw(params.values()) if params else None
    for step in range(STEPS):
        ref_loss = loss_with_target(ref(tokens), target)
        ref_loss.backward()
        loss = pm.train_step(local, target=local_target)
        assert_close(loss, ref_loss.detach(), f"loss at step {step} on {mesh}")
        grads = {n: p.grad for n, p in ref.named_parameters() if n in params}
        for name, grad in grads.items():  # this rank's share of every gradient it holds
            assert_close(params[name].grad, pm.local_shard(name, grad), f"gradient of {name} at step {step} on {mesh}")
        for o in filter(None, (opt, ropt)):
            o.step()
            o.zero_grad()
    full = pm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, f"{key} after {STEPS} steps on {mesh}")
    return repr(mesh)


@pytest.mark.parametrize("world, fixed", [(2, {}), (4, {}), (4, {"tp": 2})])
def test_parallelize_auto_trains_like_one_process(pools, world, fixed):
    meshes = pools(world).run(_train_auto, **fixed)
    assert len(set(meshes)) == 1
    assert all(f"{k}={v}" in meshes[0] for k, v in fixed.items())


def test_even_cuts_share_the_blocks_out():
    from fxpar.blocks import even_cuts

    model, (tokens,) = llama.build(n_layers=10)
    plan = fxpar.compile(model, fxpar.Mesh(pp=4), (tokens,), microbatches=2,
                         split_points=even_cuts(fxpar.capture(model, (tokens,)).gm, 4))
    blocks = [sorted({m.split(".")[1] for m in s.modules if m.startswith("layers.")}, key=int)
              for s in plan.ctx.pipeline.stages]
    assert [len(b) for b in blocks] == [2, 2, 3, 3], blocks
    assert even_cuts(fxpar.capture(model, (tokens,)).gm, 11) == []  # more stages than blocks: the planner decides


def test_autoplan_keeps_what_is_fixed():
    model, sample = _llama(heads=4, kv=2)
    found = fxpar.autoplan(model, world_size=4, device="cpu", global_batch=8, example_args=(sample,), verbose=False,
                           pp=2, microbatches=4, recompute="auto", memory_limit=1 << 30)
    assert found, found.rejected
    for c in found:
        assert c.mesh.pp == 2 and c.options["microbatches"] == 4 and c.options["recompute"] == "auto"


def test_a_fixed_tp_that_does_not_divide_the_heads_is_set_aside():
    model, sample = _llama(heads=4, kv=2)
    found = fxpar.autoplan(model, world_size=8, device="cpu", global_batch=8, example_args=(sample,), verbose=False,
                           tp=8)
    assert not found and found.rejected == [("tp=8", "tp=8 does not divide the 4 attention heads")]
