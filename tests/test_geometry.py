"""``ShardGeometry``: the parts it cuts a tensor into, and the boxes it says they are, put the
whole tensor back together, over tp, ep (stacked experts and expert modules) and pipeline stages."""

import pytest
import torch

import fxpar
from fxpar.models import gpt
from tests.zoo import build, hf_family


def _moe_tokens():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def _gpt(mesh, **options):
    model, args = gpt.build()
    return fxpar.compile(model, mesh, args, **options)


def _mixtral(mesh):
    pytest.importorskip("transformers")
    model, ids, _ = hf_family("mixtral")
    return fxpar.compile(model, mesh, (ids,))


CASES = {
    "gpt tp=2": lambda: _gpt(fxpar.Mesh(tp=2)),
    "gpt pp=2 tp=2": lambda: _gpt(fxpar.Mesh(pp=2, tp=2), microbatches=2),
    "moe ep=2 tp=2": lambda: fxpar.compile(build("moe")[0], fxpar.Mesh(ep=2, tp=2), (_moe_tokens(),)),
    "stacked experts ep=2 tp=2": lambda: _mixtral(fxpar.Mesh(ep=2, tp=2)),
}


@pytest.mark.parametrize("what", CASES)
def test_parts_and_boxes_make_the_whole(what):
    plan = CASES[what]()
    geo = plan.geometry
    full = plan.full_state_dict()
    assert set(full) == set(plan.model.state_dict()), what
    assert any(geo.ep_split(n) is not None for n in full) == (what == "stacked experts ep=2 tp=2")
    for name, whole in full.items():
        part = lambda r: geo.local_shard(name, whole, r)  # noqa: E731
        assert torch.equal(geo.full(name, part), whole), f"{what}: {name}"
        filled = torch.zeros_like(whole)
        for r in geo.holders(name):
            assert geo.holds(name, r), f"{what}: {name} on rank {r}"
            assert tuple(geo.local_shape(name)) == tuple(part(r).shape), f"{what}: {name}"
            for offsets, view in geo.pieces(name, part(r), r):
                filled[tuple(slice(o, o + n) for o, n in zip(offsets, view.shape))] = view
        assert torch.equal(filled, whole), f"{what}: the boxes of {name} leave a hole"


def test_an_expert_module_is_held_by_one_ep_rank():
    plan = fxpar.compile(build("moe")[0], fxpar.Mesh(ep=2), (_moe_tokens(),))
    geo = plan.geometry
    experts = [n for n in plan.model.state_dict() if geo.ep_holder(n) is not None]
    assert experts and all(geo.is_expert(n) for n in experts)
    holders = {geo.ep_holder(n) for n in experts}
    assert holders == {0, 1}
    for name in experts:
        ep = geo.ep_holder(name)
        assert [plan.mesh.coordinate(r)["ep"] for r in geo.holders(name)] == [ep]
        assert [geo.holds(name, r) for r in range(plan.mesh.size)] == [
            plan.mesh.coordinate(r)["ep"] == ep for r in range(plan.mesh.size)]
        other = next(r for r in range(plan.mesh.size) if not geo.holds(name, r))
        assert geo.local_shard(name, plan.model.state_dict()[name], other) is None
