"""Data-parallel gradient all-reduces begun while backward still runs (``overlap=True``, the
default; ``fxpar/runtime/overlap.py``), over gloo: the same gradients as reducing at the end,
the all-reduces begin before backward ends, and the trace shows them on a row of their own."""

import copy
import json
import os

import torch.distributed as dist

import fxpar
from tests.zoo import assert_close, loss_with_target, pipeline_case


def _overlapped(tmp):
    from fxpar.runtime import buckets

    saved, buckets.BUCKET_BYTES = buckets.BUCKET_BYTES, 16 << 10  # several buckets of a small model
    try:
        return _compare(tmp)
    finally:
        buckets.BUCKET_BYTES = saved


def _compare(tmp):
    model, args, target = pipeline_case("llama", 4)
    mesh = fxpar.Mesh(dp=2)
    dp = mesh.coordinate(dist.get_rank())["dp"]
    local, local_target = args[0].chunk(2)[dp], target.chunk(2)[dp]
    runs = {}
    for overlap in (False, True):
        pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_args=(local,), loss_fn=loss_with_target,
                               microbatches=2, overlap=overlap)
        for step in range(3):  # the first learns when each gradient is final
            pm.zero_grad()
            loss = pm.train_step(local, target=local_target)
        runs[overlap] = (loss, {n: p.grad.clone() for n, p in pm.named_parameters()}, pm.step_events())
    (loss0, grads0, events0), (loss1, grads1, events1) = runs[False], runs[True]
    assert_close(loss1, loss0, "loss")
    for n, g in grads0.items():
        assert_close(grads1[n], g, f"gradient of {n}")
    assert not [e for e in events0 if e[0].startswith("comm ")]
    begun = [e for e in events1 if e[0].startswith("comm dp all_reduce")]
    last_backward = max(t1 for name, _, t1 in events1 if name[0] in "BW")
    assert len(begun) >= 1 and min(t0 for _, t0, _ in begun) < last_backward  # begun during backward
    path = os.path.join(tmp, "trace.json")
    pm.save_trace(path)
    if dist.get_rank() == 0:
        rows = {e["args"]["name"] for e in json.load(open(path))["traceEvents"] if e["ph"] == "M"}
        assert "rank 0 collectives" in rows
    return len(begun)


def test_all_reduces_begin_during_backward(pools, tmp_path):
    counts = pools(2).run(_overlapped, str(tmp_path))
    assert len(set(counts)) == 1 and counts[0] >= 2  # the same buckets on both replicas, several of them
