"""Ranks that disagree (on their inputs, their model, their options) get a ``RankMismatchError``
naming the difference, on every rank, before anything variable-sized is exchanged: never a wrong
answer, never a process killed inside gloo, never a hang."""

import torch
import torch.distributed as dist
import torch.nn as nn

import fxpar
from fxpar.models import gpt
from tests.zoo import build, error_of, loss_with_target


def _ddp_habit():
    """Each tensor-parallel rank its own batch, of the same shape."""
    model, (idx,) = build("gpt")
    mine = torch.randint(0, 256, idx.shape, generator=torch.Generator().manual_seed(dist.get_rank()))
    return error_of(lambda: fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(mine,)))


def test_tensor_parallel_ranks_with_different_batches_are_refused(pools):
    for msg in pools(2).run(_ddp_habit):
        assert msg.startswith("RankMismatchError: ranks 0 and 1 belong to one model replica"), msg
        assert "argument 'idx' differs (its values differ; shape (2, 16) int64 on both)" in msg
        assert "mesh.replica(rank)" in msg


def _same_count_other_shape():
    model, (idx,) = build("gpt")  # (2, 16)
    mine = idx if dist.get_rank() == 0 else idx.reshape(4, 8)
    return error_of(lambda: fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(mine,)))


def test_inputs_of_another_shape_are_refused_naming_both(pools):
    for msg in pools(2).run(_same_count_other_shape):
        assert msg.startswith("RankMismatchError: the ranks were called with inputs of different shapes"), msg
        assert "idx: (2, 16) int64 on rank 0; (4, 8) int64 on rank 1" in msg


def _different_depth():
    model, (idx,) = gpt.build(n_layer=2 + dist.get_rank())
    return error_of(lambda: fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,)))


def test_models_of_different_sizes_are_refused_without_killing_a_process(pools):
    # this used to abort the process inside gloo (the same-model check gathered per-tensor sums)
    for msg in pools(2).run(_different_depth):
        assert msg.startswith("RankMismatchError: the ranks hold different models"), msg
        assert "rank 1 has 3 layers' parameters in 'transformer.h' (41 tensors), rank 0 has 2 (29)" in msg
        assert "'transformer.h.2.ln_1.weight' is on rank 1 only" in msg


def _different_options():
    model, (idx,) = build("gpt")
    return error_of(lambda: fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,),
                                              sequence_parallel=dist.get_rank() == 1))


def _different_meshes():
    model, (idx,) = build("gpt")
    mesh = fxpar.Mesh(tp=2) if dist.get_rank() == 0 else fxpar.Mesh(dp=2)
    return error_of(lambda: fxpar.parallelize(model, mesh, example_args=(idx,)))


def test_ranks_with_different_options_or_meshes_are_refused(pools):
    for msg in pools(2).run(_different_options):
        assert "different options for fxpar.parallelize" in msg
        assert "sequence_parallel: false on rank 0; true on rank 1" in msg
    for msg in pools(2).run(_different_meshes):  # refused before a process group is made for either
        assert "mesh: Mesh(dp=1, pp=1, tp=2) on rank 0; Mesh(dp=2, pp=1, tp=1) on rank 1" in msg, msg


def _later_call(mode: str):
    model, (idx,) = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,), check_inputs=mode)
    pm(idx)
    mine = torch.randint(0, 256, idx.shape, generator=torch.Generator().manual_seed(10 + dist.get_rank()))
    return error_of(lambda: pm(mine))  # a signature seen before


def test_check_inputs_always_checks_every_call(pools):
    assert all("RankMismatchError" in m for m in pools(2).run(_later_call, "always"))
    assert pools(2).run(_later_call, "first") == ["no error"] * 2  # checked at a signature's first call only
    assert pools(2).run(_later_call, "never") == ["no error"] * 2


def _replicas_and_their_tp_ranks(tp_ranks_agree: bool):
    model, (idx,) = build("gpt")
    mesh = fxpar.Mesh(dp=2, tp=2)
    replica = mesh.replica(dist.get_rank())
    seed = replica if tp_ranks_agree else dist.get_rank()
    mine = torch.randint(0, 256, idx.shape, generator=torch.Generator().manual_seed(seed))
    return error_of(lambda: fxpar.parallelize(model, mesh, example_args=(mine,), loss_fn=loss_with_target,
                                              example_target=mine))


def test_data_parallel_replicas_take_their_own_batch_but_their_tp_ranks_share_it(pools):
    assert pools(4).run(_replicas_and_their_tp_ranks, True) == ["no error"] * 4
    msgs = pools(4).run(_replicas_and_their_tp_ranks, False)
    assert all("ranks 0 and 1 belong to one model replica" in m and "argument 'idx' differs" in m for m in msgs), msgs


def _train_step_without_target():
    model, (idx,) = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=(idx,), loss_fn=loss_with_target, microbatches=2)
    return error_of(lambda: pm.train_step(idx))


def test_train_step_without_target_fails_on_every_rank(pools):
    for msg in pools(2).run(_train_step_without_target):
        assert "train_step was called without target=" in msg and "loss_with_target(out, target)" in msg, msg


def _meta_input():
    model, (idx,) = build("gpt")
    return error_of(lambda: fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx.to("meta"),)))


def test_a_meta_input_is_named(pools):
    for msg in pools(2).run(_meta_input):
        assert "input 'idx' is on the meta device" in msg and "fxpar.compile" in msg, msg


class RankDependent(nn.Module):
    """Model code that fails to capture on one rank only."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if dist.get_rank() == 1 and x.sum() > 0:  # data-dependent on rank 1 only
            x = x * 2
        return self.proj(x)


def _fails_on_one_rank():
    torch.manual_seed(0)
    return error_of(lambda: fxpar.parallelize(RankDependent(), fxpar.Mesh(tp=2), example_args=(torch.ones(2, 8),)))


def test_a_rank_that_fails_alone_while_planning_stops_every_rank(pools):
    rank0, rank1 = pools(2).run(_fails_on_one_rank)
    assert rank1.startswith("CaptureError"), rank1
    assert rank0.startswith("FxparError: rank 1 failed to capture and plan the model"), rank0
    assert "CaptureError" in rank0


def _new_shape_on_one_rank():
    model, (idx,) = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,), timeout=60)
    pm(idx)
    # rank 0 has a program for this call, rank 1 has none: it must not be left checking alone
    return error_of(lambda: pm(idx if dist.get_rank() == 0 else idx[:, :8]))


def test_a_call_new_on_one_rank_only_is_refused_at_once(pools):
    for msg in pools(2).run(_new_shape_on_one_rank, timeout=50):
        assert msg.startswith("RankMismatchError: the ranks were called with inputs of different shapes"), msg
        assert "(2, 16) int64 on rank 0; (2, 8) int64 on rank 1" in msg


def _target_on_the_last_stage_only():
    model, (idx,) = build("gpt")
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=(idx,), loss_fn=loss_with_target, microbatches=2)
    return error_of(lambda: pm.train_step(idx, target=idx if dist.get_rank() == 1 else None))


def test_a_target_given_to_some_ranks_only_is_refused_on_every_rank(pools):
    for msg in pools(2).run(_target_on_the_last_stage_only, timeout=50):
        assert msg.startswith("RankMismatchError") and "target: None on rank 0; (2, 16) int64 on rank 1" in msg, msg
