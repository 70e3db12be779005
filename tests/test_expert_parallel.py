"""Expert parallelism: each ep rank holds 1/ep of every mixture-of-experts layer's experts and
trains on its own part of the batch; tokens travel to their experts by all-to-all. Outputs, every
gradient and the weights after 3 AdamW steps equal the single-device model trained on the whole
batch, for the reference MoE (one module per expert) and Hugging Face's Mixtral and Qwen3-MoE
(stacked experts, grouped matmuls), at ep=2 and ep=2 x tp=2, simulated and over gloo."""

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.metadata import COMM
from fxpar.placement import Shard
from tests.test_pipeline_simulated import check_pipeline
from tests.zoo import adamw, assert_close, build, hf_family, hf_loss, logits, loss_with_target, train_alike

STEPS = 3


def moe_case(seed: int = 5):
    """The reference MoE and a batch of 4 different sequences with a target (each ep rank's part
    differs, so a token answered by the wrong rank shows)."""
    model, _ = build("moe")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (4, 16), generator=g)
    with torch.no_grad():
        out = logits(model(tokens))
    return model, (tokens,), torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)


def check_moe(mesh: fxpar.Mesh, **options):
    """Simulate training the reference MoE on ``mesh``; compare with the single-device model."""
    return check_pipeline("moe", mesh.dp, mesh.pp, mesh.tp, "1f1b", 1, ep=mesh.ep, case=moe_case(), **options)


def check_hf(name: str, mesh: fxpar.Mesh, steps: int = STEPS):
    """Simulate training a Hugging Face MoE family with its own loss (labels) on ``mesh``."""
    pytest.importorskip("transformers")
    model, ids, labels = hf_family(name)
    ref = copy.deepcopy(model)
    plan = fxpar.compile(model, mesh, (ids,), {"labels": labels}, loss_fn=hf_loss)
    train_alike(ref, lambda r: r(ids, labels=labels).loss, lambda: plan.simulate_train(None, ids, labels=labels),
                [adamw(ps) for ps in plan.optimizer_params()], plan.full_state_dict, f"{name} {mesh}", steps)
    return plan


def kinds(plan) -> Counter:
    return Counter((n.meta[COMM].group, n.meta[COMM].kind) for n in plan.graph_module.graph.nodes if COMM in n.meta)


@pytest.mark.parametrize("tp", [1, 2])
def test_reference_moe(tp):
    plan = check_moe(fxpar.Mesh(ep=2, tp=tp))
    layers = plan.ctx.expert_layers
    assert [(x.name, x.experts, x.form) for x in layers] == [(f"layers.{i}.moe.experts", 4, "modules") for i in range(2)]
    # a dispatch and a combine per layer, nothing else over ep
    assert kinds(plan)[("ep", "all_to_all")] == 4 and sum(v for (g, _), v in kinds(plan).items() if g == "ep") == 4
    # ep rank 1 runs experts 2 and 3 where the graph names 0 and 1; it holds no other expert
    assert plan.ctx.expert_slots["layers.0.moe.experts.1.w2.weight"] == (
        "layers.0.moe.experts.1.w2.weight", "layers.0.moe.experts.3.w2.weight")
    held = {n for n, _ in plan.program(plan.mesh.rank_of(ep=1)).full.named_parameters() if ".experts." in n}
    assert held == {f"layers.{i}.moe.experts.{e}.{w}.weight" for i in range(2) for e in (2, 3) for w in ("w1", "w2", "w3")}
    if tp == 2:  # experts split inside too: column- then row-parallel
        assert plan.ctx.param_placements["layers.0.moe.experts.0.w1.weight"] == Shard.even(0, 64, 2)


def test_reference_moe_four_experts_over_four_ranks_and_replicas():
    check_moe(fxpar.Mesh(ep=4))
    check_moe(fxpar.Mesh(dp=2, ep=2))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hugging_face_grouped_experts(name, tp):
    plan = check_hf(name, fxpar.Mesh(ep=2, tp=tp))
    assert [x.form for x in plan.ctx.expert_layers] == ["grouped", "grouped"]
    # stacked (experts, ...) weights: each ep rank holds half of the experts, tp splits inside
    stacked = [t for t in plan.ctx.expert_shards if t.endswith(("gate_up_proj", "down_proj"))]
    assert len(stacked) == 4 and all(plan.ctx.expert_shards[t] == Shard.even(0, 4, 2) for t in stacked)
    if tp == 2:
        assert all(isinstance(plan.ctx.param_placements[t], Shard) and plan.ctx.param_placements[t].dim > 0 for t in stacked)
    held = plan.program(0).full.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert held.shape[0] == 2


@pytest.mark.parametrize("name", ["olmoe", "qwen2_moe", "granitemoe"])
def test_other_moe_families(name):
    check_hf(name, fxpar.Mesh(ep=2, tp=2), steps=1)


def test_with_pipeline_stages_and_sequence_parallelism():
    plan = check_pipeline("moe", 1, 2, 1, "1f1b", 2, ep=2, case=moe_case())
    assert len(plan.ctx.pipeline.stages) == 2 and len(plan.ctx.expert_layers) == 2
    plan = check_moe(fxpar.Mesh(ep=2, tp=2), sequence_parallel=True)
    assert plan.ctx.sequence_split


def test_expert_report_shows_experts_and_tokens_per_rank():
    plan = check_moe(fxpar.Mesh(ep=2))
    text = plan.summary()
    assert "expert parallel: 2 layers" in text and "2 of 4 experts per ep rank" in text, text
    report = plan.expert_report()
    # every routed slot reaches one expert: the ranks' rows add up to tokens x top-k per layer
    rows = plan.routed_tokens()
    assert set(rows) == {"layers.0.moe.experts", "layers.1.moe.experts"}
    for layer, per_rank in rows.items():
        assert len(per_rank) == 2 and all(len(r) == 2 for r in per_rank)
        assert sum(sum(r) for r in per_rank) == 4 * 16 * 2, (layer, per_rank)
        assert layer in report and str(sum(per_rank[1])) in report


def test_errors_name_what_to_change():
    model, args, _ = moe_case()
    with pytest.raises(fxpar.FxparError, match="do not split evenly over ep=8"):
        fxpar.compile(model, fxpar.Mesh(ep=8), (torch.cat([args[0]] * 2),))
    dense, dargs = build("llama")
    with pytest.raises(fxpar.FxparError, match="use dp instead of ep"):
        fxpar.compile(dense, fxpar.Mesh(ep=2), dargs)
    with pytest.raises(ValueError, match="use ep or cp"):
        fxpar.compile(model, fxpar.Mesh(ep=2, cp=2), args)
    with pytest.raises(fxpar.FxparError, match=r"replicas of Mesh\(dp=1, pp=1, ep=2, tp=1\)"):
        plan = fxpar.compile(model, fxpar.Mesh(ep=2), args)
        plan.simulate(args[0][:3])


def train_over_processes(name: str, ep: int, tp: int, dp: int = 1, **options) -> int:
    """Each rank trains its replica's part of the batch with ``train_step``; loss, the rank's
    part of every gradient and the gathered weights equal the single-device model's."""
    mesh = fxpar.Mesh(dp=dp, ep=ep, tp=tp)
    rank = dist.get_rank()
    part = mesh.replica(rank)
    if name == "moe":
        model, args, target = moe_case()
        kwargs, loss_fn = {}, loss_with_target
        whole = lambda m: loss_with_target(m(*args), target)  # noqa: E731
    else:
        model, ids, labels = hf_family(name)
        args, target, kwargs, loss_fn = (ids,), None, {"labels": labels}, hf_loss
        whole = lambda m: m(ids, labels=labels).loss  # noqa: E731
    local = tuple(a.chunk(mesh.replicas)[part] for a in args)
    local_kwargs = {k: v.chunk(mesh.replicas)[part] for k, v in kwargs.items()}
    local_target = None if target is None else target.chunk(mesh.replicas)[part]
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters())
    pm = fxpar.parallelize(model, mesh, example_args=local, example_kwargs=local_kwargs or None, loss_fn=loss_fn,
                           example_target=local_target, **options)
    params = dict(pm.named_parameters())
    opt = adamw(params.values())
    for step in range(STEPS):
        ref_loss = whole(ref)
        ref_loss.backward()
        loss = pm.train_step(*local, target=local_target, **local_kwargs)
        assert_close(loss, ref_loss.detach(), f"rank {rank} loss at step {step}")
        for pname, p in ref.named_parameters():
            mine = pm.local_shard(pname, p.grad)
            assert (pname in params) == (mine is not None), pname
            if mine is not None:
                assert_close(params[pname].grad, mine, f"rank {rank} step {step} gradient of {pname}")
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    full = pm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, f"rank {rank} {key} after {STEPS} steps")
    pm.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(logits(pm(*local, **local_kwargs)), logits(ref(*local, **local_kwargs)), f"rank {rank} inference")
    routed = pm.routed_tokens()  # this rank's experts, in the inference just run
    assert len(routed) == 2 and all(len(rows) == 2 for rows in routed.values()), routed
    return pm.comm_bytes().get("ep all_to_all", 0), routed


@pytest.mark.parametrize("ep, tp", [(2, 1), (2, 2)])
def test_reference_moe_over_processes(pools, ep, tp):
    out = pools(ep * tp).run(train_over_processes, "moe", ep, tp)
    assert all(sent > 0 for sent, _ in out)
    # every routed slot of the batch reaches one expert of one ep rank (tp ranks see the same)
    mesh = fxpar.Mesh(ep=ep, tp=tp)
    firsts = [out[mesh.rank_of(ep=q)][1] for q in range(ep)]
    for layer in firsts[0]:
        assert sum(sum(r[layer]) for r in firsts) == 4 * 16 * 2, layer


@pytest.mark.parametrize("zero", [1, 3])
def test_zero_splits_dense_weights_over_dp_and_ep(pools, zero):
    """At dp=2 x ep=2 a dense weight's rows are split over all four replicas, an expert's over
    its two dp ranks; training equals the single-device model's."""
    pools(4).run(train_over_processes, "moe", 2, 1, dp=2, zero=zero)
    model, args, _ = moe_case()
    plan = fxpar.compile(model, fxpar.Mesh(dp=2, ep=2), args, zero=zero)
    groups = {plan.ctx.zero_group(t) for t in plan.ctx.zero_rows}
    assert groups == {"dp", "dp_ep"}
    # each rank steps a quarter of every weight (splitting dense weights over dp only would leave
    # each rank half of them)
    whole = sum(p.numel() for p in model.parameters())
    assert [sum(p.numel() for p in ps) for ps in plan.optimizer_params()] == [whole // 4] * 4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("ep, tp", [(2, 1), (2, 2)])
def test_hugging_face_over_processes(pools, name, ep, tp):
    pytest.importorskip("transformers")
    pools(ep * tp).run(train_over_processes, name, ep, tp)


def _save_at(path: str, mesh: dict) -> dict:
    """One training step of the reference MoE on ``mesh``, saved with its optimizer; the weights."""
    mesh = dict(mesh)
    zero = mesh.pop("zero", 0)
    m = fxpar.Mesh(**mesh)
    model, args, target = moe_case()
    part = m.replica(dist.get_rank())
    local, local_target = args[0].chunk(m.replicas)[part], target.chunk(m.replicas)[part]
    pm = fxpar.parallelize(model, m, example_args=(local,), loss_fn=loss_with_target, example_target=local_target,
                           zero=zero)
    opt = adamw(pm.parameters())
    pm.train_step(local, target=local_target)
    opt.step()
    fxpar.save(pm, path, optimizer=opt)
    return pm.full_state_dict()


def _load_at(path: str, mesh: dict) -> dict:
    mesh = dict(mesh)
    zero = mesh.pop("zero", 0)
    m = fxpar.Mesh(**mesh)
    model, args, target = moe_case(seed=9)  # other weights: all of them must come from the file
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    part = m.replica(dist.get_rank())
    local = args[0].chunk(m.replicas)[part]
    pm = fxpar.parallelize(model, m, example_args=(local,), loss_fn=loss_with_target,
                           example_target=target.chunk(m.replicas)[part], zero=zero)
    fxpar.load(pm, path, optimizer=adamw(pm.parameters()))
    return pm.full_state_dict()


def test_checkpoint_saved_at_ep_resumes_on_other_meshes(pools, tmp_path):
    path = str(tmp_path / "ep2")
    saved = pools(2).run(_save_at, path, dict(ep=2))[0]
    for world, mesh in ((2, dict(tp=2)), (4, dict(ep=2, tp=2)), (4, dict(dp=2, ep=2, zero=3))):
        loaded = pools(world).run(_load_at, path, mesh)[0]
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), f"{mesh}: {key}"
    # and back: saved with dense rows over dp x ep, loaded without zero
    again = str(tmp_path / "dp2ep2")
    saved = pools(4).run(_save_at, again, dict(dp=2, ep=2, zero=2))[0]
    loaded = pools(2).run(_load_at, again, dict(ep=2))[0]
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), f"dp2 x ep2 zero 2 -> ep2: {key}"


def test_dispatch_and_combine_when_a_rank_gets_no_rows():
    """Every row comes back to where it was, through forward and backward, when the experts of
    one rank get nothing and another sends nothing to some of them."""
    from fxpar.ops import experts as X
    from fxpar.simulate import mesh_contexts, run_ranks

    counts = [[3, 0, 0, 0], [0, 5, 0, 0]]  # experts 2 and 3 (ep rank 1) get no rows at all

    def body(r):
        rows = [torch.randn(n, 4, requires_grad=True) for n in counts[r]]
        *mine, splits = X.dispatch_rows(rows)
        assert [m.shape[0] for m in mine] == ([3, 5] if r == 0 else [0, 0])
        back = X.combine_rows([2 * m for m in mine], splits, [x.shape[0] for x in rows])
        sum((b * (e + 1)).sum() for e, b in enumerate(back)).backward()
        for e, (x, b) in enumerate(zip(rows, back)):
            assert torch.equal(b, 2 * x.detach()) and torch.equal(x.grad, torch.full_like(x, 2.0 * (e + 1)))
        return splits[1].sum(0).tolist()

    contexts, _ = mesh_contexts(fxpar.Mesh(ep=2), 0, False)
    assert run_ranks(body, contexts) == [[3, 5], [0, 0]]
