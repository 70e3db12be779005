"""``torch.autocast`` around a parallel model computes what eager autocast computes: the same ops
in the same dtypes (the casts written into the graph), on every rank and stage."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxpar
from fxpar.simulate import run_ranks
from tests.zoo import adamw, build, hf_family, logits, loss_with_target, pipeline_case

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# what the graph leaves out or adds without computing: casts (compared by count), views export
# records differently, checks
_NOT_COMPUTE = {"_to_copy.default", "detach.default", "alias.default", "_assert_tensor_metadata.default",
                "lift_fresh.default"}


class _Ops(TorchDispatchMode):
    """Every op dispatched, with the dtypes of what it returns."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__, tuple(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))))
        return out

    def compute(self):
        return [o for o in self.ops if o[0] not in _NOT_COMPUTE]

    def casts(self):
        return [o for o in self.ops if o[0] == "_to_copy.default"]


@pytest.mark.parametrize("name", ["gpt_matmul", "llama"])
def test_every_op_computes_in_eager_autocasts_dtype(name):
    model, args = build(name)
    with torch.autocast(**BF16):
        with _Ops() as eager:
            model(*args)
        plan = fxpar.compile(model, fxpar.Mesh(tp=1), args)
    mod = plan.rank_module(0)

    def run(r):
        with _Ops() as mine:  # no autocast here: the casts are in the graph
            mod(*args)
        return mine

    mine = run_ranks(run, plan._contexts())[0]
    assert mine.compute() == eager.compute()
    assert mine.casts() == eager.casts()
    assert any(dt == (torch.bfloat16,) for op, dt in mine.compute() if op.startswith(("mm", "bmm", "addmm")))


@pytest.mark.parametrize("name", ["gpt", "llama", "hf_llama", "hf_gpt2"])
def test_outputs_equal_eager_autocast(name):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    model, args = build(name)
    with torch.autocast(**BF16):
        expect = logits(model(*args))
        one = logits(fxpar.compile(model, fxpar.Mesh(tp=1), args).simulate(*args))
        two = logits(fxpar.compile(model, fxpar.Mesh(tp=2), args).simulate(*args))
    assert one.dtype == two.dtype == expect.dtype
    assert torch.equal(one, expect)  # the same ops in the same dtypes: the same bits
    # split over tp the sums run in another order: bf16's rounding of the output apart
    torch.testing.assert_close(two.float(), expect.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["qwen3", "gpt_neo", "deepseek_v3"])
def test_families_whose_code_reads_dtypes(name):
    """Qwen3's per-head norms cast back to the dtype they read off their input, GPT-Neo's mask
    value is the minimum of the query's dtype, DeepSeek-V3's attention meets fp32 rotary parts and
    bf16 projections in a buffer: all as eager autocast has them (the capture runs on fake tensors
    of the call's device under autocast), bit for bit at tp=1."""
    pytest.importorskip("transformers")
    model, ids, _ = hf_family(name)
    model.eval()
    with torch.autocast(**BF16):
        expect = logits(model(ids))
        got = logits(fxpar.compile(model, fxpar.Mesh(tp=1), (ids,)).simulate(ids))
    assert got.dtype == expect.dtype and torch.equal(got, expect)


def test_the_listing_shows_the_casts_and_fp32_plans_have_none():
    model, args = build("gpt_matmul")
    with torch.autocast(**BF16):
        code = fxpar.compile(model, fxpar.Mesh(tp=2), args).rank_code(0)
    assert "aten.to(attn.c_attn.weight, dtype=torch.bfloat16)" in code
    plain = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    assert not any(n.target == torch.ops.aten.to.dtype for n in plain.graph_module.graph.nodes)


# over gloo ---------------------------------------------------------------------------------------
def _autocast_over_gloo():
    model, args, target = pipeline_case("gpt", 2)
    ref = copy.deepcopy(model)
    mesh = fxpar.Mesh(dp=2, tp=2)
    dp = mesh.coordinate(dist.get_rank())["dp"]
    local, local_target = tuple(a.chunk(2)[dp] for a in args), target.chunk(2)[dp]
    pm = fxpar.parallelize(model, mesh, example_args=local, loss_fn=loss_with_target, microbatches=1)
    opt, ropt = adamw(pm.parameters()), adamw(ref.parameters())
    drift = []
    for _ in range(3):
        with torch.autocast(**BF16):
            loss = pm.train_step(*local, target=local_target)
            expect = loss_with_target(ref(*args), target)
        expect.backward()
        drift.append(abs(loss.item() - expect.item()) / expect.item())
        for o in (opt, ropt):
            o.step()
            o.zero_grad()
    with torch.no_grad():
        with torch.autocast(**BF16):
            out = pm(*local)
        plain = pm(*local)  # outside autocast: a program of its own, in fp32
    assert {p.dtype for p in pm.parameters()} == {torch.float32}
    return max(drift), out.dtype, plain.dtype


def test_autocast_over_gloo(pools):
    for drift, out, plain in pools(4).run(_autocast_over_gloo):
        assert drift < 1e-2 and out == torch.bfloat16 and plain == torch.float32
