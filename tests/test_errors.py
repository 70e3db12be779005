"""Bad input gets a clear error that names what is wrong and what to do; never a hang."""

import datetime
import multiprocessing
import os
import time

import pytest
import torch
import torch.nn as nn

import fxpar
from tests.distributed import Pool, _free_port
from tests.zoo import build


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.proj(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: cannot be one graph
            return x * 2
        return x


def test_capture_error_names_module_line_and_remedy():
    with pytest.raises(fxpar.CaptureError) as info:
        fxpar.compile(Branchy(), fxpar.Mesh(tp=2), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "'gate' (Gate)" in msg
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg
    assert "What to do:" in msg and "branches on tensor values" in msg


def test_capture_error_for_cache_objects_suggests_use_cache_false():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
    with pytest.raises(fxpar.CaptureError, match="use_cache=False"):
        fxpar.compile(model, fxpar.Mesh(tp=2), (torch.randint(0, 64, (1, 4)),))


@pytest.mark.parametrize("bad", [dict(tp=0), dict(tp=-2), dict(dp=1.5), dict(pp=True)])
def test_mesh_rejects_non_positive_sizes(bad):
    with pytest.raises(fxpar.MeshError, match="positive int"):
        fxpar.Mesh(**bad)


def test_mesh_rank_outside():
    with pytest.raises(fxpar.MeshError, match="outside"):
        fxpar.Mesh(tp=2).coordinate(2)


def test_device_mesh_without_names():
    class FakeDeviceMesh:
        mesh = torch.zeros(2)
        mesh_dim_names = None

    with pytest.raises(fxpar.MeshError, match="mesh_dim_names"):
        fxpar.mesh.as_mesh(FakeDeviceMesh())


def test_device_mesh_unknown_or_misordered_names():
    class DM:
        def __init__(self, names):
            self.mesh = torch.zeros(2, 2)
            self.mesh_dim_names = names

    with pytest.raises(fxpar.MeshError, match="not among"):
        fxpar.mesh.as_mesh(DM(("dp", "sp")))
    with pytest.raises(fxpar.MeshError, match="tp innermost"):
        fxpar.mesh.as_mesh(DM(("tp", "dp")))
    assert fxpar.mesh.as_mesh(DM(("dp", "tp"))) == fxpar.Mesh(dp=2, tp=2)


def test_unknown_override_style():
    model, args = build("mlp")
    with pytest.raises(ValueError, match="not one of"):
        fxpar.compile(model, fxpar.Mesh(tp=2), args, overrides={"blocks.0.fc1": "diagonal"})


def test_meta_buffers_without_values_are_named():
    from fxpar.models import gpt

    with torch.device("meta"):
        model, _ = gpt.build(flash=False)  # registers a causal-mask buffer
    idx = torch.randint(0, 256, (2, 16))
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,))
    with pytest.raises(fxpar.FxparError, match=r"transformer\.h\.0\.attn\.bias.*meta device.*init_fn"):
        plan.rank_module(0)


class Cumulative(nn.Module):
    """A column-parallel projection forced to stay split, then an op with no sharding rule."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)

    def forward(self, x):
        return torch.flip(self.up(x), dims=[-1]).sum(-1)


def test_op_without_rule_gathers_with_a_warning_naming_the_node():
    model = Cumulative()
    x = torch.randn(4, 8)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (x,), overrides={"up": "colwise"})
    warnings = "\n".join(plan.ctx.warnings)
    assert "no sharding rule for flip" in warnings and "node flip" in warnings and "test_errors.py" in warnings
    torch.testing.assert_close(plan.simulate(x), model(x))
    # without the override the planner keeps the projection whole: nothing to gather
    auto = fxpar.compile(model, fxpar.Mesh(tp=2), (x,))
    assert not auto.ctx.warnings
    assert auto.ctx.decisions["up"].startswith("replicate: its output is gathered before flip")


def _world_mismatch():
    model, args = build("mlp")
    try:
        fxpar.parallelize(model, fxpar.Mesh(tp=4), example_args=args)
    except fxpar.MeshError as e:
        return str(e)
    return "no error"


def test_mesh_world_mismatch(pools):
    msgs = pools(2).run(_world_mismatch)
    assert all("Mesh(dp=1, pp=1, tp=4) has 4 ranks but the torch.distributed world has 2" in m for m in msgs)


def test_parallelize_without_process_group():
    model, args = build("mlp")
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        with pytest.raises(fxpar.MeshError, match="torchrun"):
            fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args)
    finally:
        os.environ.update(env)


def _one_rank_fails():
    import torch.distributed as dist

    model, args = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args, timeout=datetime.timedelta(seconds=3))
    if dist.get_rank() == 1:
        return "failed before the forward"
    t0 = time.monotonic()
    try:
        pm(*args)
    except fxpar.CollectiveError as e:
        return f"{time.monotonic() - t0:.1f}s {e}"
    return "no error"


def test_a_rank_that_fails_gives_an_error_not_a_hang():
    pool = Pool(2)
    try:
        msg = pool.run(_one_rank_fails, timeout=120)[0]
    finally:
        pool.close()
    seconds = float(msg.split("s ", 1)[0])
    assert seconds < 30, msg
    assert "timeout 3s" in msg and "Another rank has probably failed" in msg


def _die_or_wait(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    model, args = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args, timeout=datetime.timedelta(seconds=60))
    if rank == 1:
        os._exit(3)  # the process dies: no exception, no goodbye
    time.sleep(1)
    t0 = time.monotonic()
    try:
        pm(*args)
        out.put("no error")
    except fxpar.CollectiveError as e:
        out.put(f"{time.monotonic() - t0:.1f}s {e}")


def test_a_rank_that_dies_gives_an_error_not_a_hang():
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_die_or_wait, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    msg = out.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    seconds = float(msg.split("s ", 1)[0])
    assert seconds < 30, msg
    assert "rank 0 of 2" in msg
