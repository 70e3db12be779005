"""Communication beside computation (``overlap=True``, the default). Data-parallel gradient
all-reduces begun while backward still runs (``fxpar/runtime/overlap.py``), over gloo: the same
gradients as reducing at the end, the all-reduces begin before backward ends, and the trace shows
them on a row of their own. Collectives of the per-rank program begun early and waited for late
(``passes/overlap_collectives.py``) and sequence parallelism's collective matmuls
(``passes/collective_matmuls.py``): in the code a rank runs, and over gloo the same gradients as
without them, with their transfers in the step's events."""

import copy
import json
import os

import pytest
import torch.distributed as dist

import fxpar
from tests.zoo import assert_close, hf_family, hf_loss, loss_with_target, pipeline_case


def _overlapped(tmp, zero=0):
    from fxpar.runtime import buckets

    saved, buckets.BUCKET_BYTES = buckets.BUCKET_BYTES, 16 << 10  # several buckets of a small model
    try:
        return _compare(tmp, zero)
    finally:
        buckets.BUCKET_BYTES = saved


def _compare(tmp, zero):
    model, args, target = pipeline_case("llama", 4)
    mesh = fxpar.Mesh(dp=2)
    dp = mesh.coordinate(dist.get_rank())["dp"]
    local, local_target = args[0].chunk(2)[dp], target.chunk(2)[dp]
    runs = {}
    for overlap in (False, True):
        pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_args=(local,), loss_fn=loss_with_target,
                               microbatches=2, overlap=overlap, zero=zero)
        for step in range(3):  # the first learns when each gradient is final
            pm.zero_grad()
            loss = pm.train_step(local, target=local_target)
        runs[overlap] = (loss, {n: p.grad.clone() for n, p in pm.named_parameters()}, pm.step_events())
    (loss0, grads0, events0), (loss1, grads1, events1) = runs[False], runs[True]
    assert_close(loss1, loss0, "loss")
    for n, g in grads0.items():
        assert_close(grads1[n], g, f"gradient of {n}")
    assert not [e for e in events0 if e[0].startswith("comm ")]
    kind = "comm dp reduce_scatter" if zero >= 2 else "comm dp all_reduce"
    begun = [e for e in events1 if e[0].startswith(kind) and not e[0].endswith(" waited")]
    if zero >= 2:  # every one begun is finished within the step, the last ones as it ends
        assert len([e for e in events1 if e[0] == kind + " waited"]) == len(begun)
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


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_reduce_scatters_begin_during_backward(pools, tmp_path, zero):
    """Each layer's gradient reduce-scatter begun as its backward ends, finished while the layers
    before it run theirs (``fxpar.ops.params.Reductions``): the same rows' gradients."""
    counts = pools(2).run(_overlapped, str(tmp_path), zero)
    assert len(set(counts)) == 1 and counts[0] >= 4  # one per layer and microbatch


def _hf_plan(name, **options):
    model, ids, _ = hf_family(name)
    return fxpar.compile(model, fxpar.Mesh(tp=2), (ids,), **options)


@pytest.mark.parametrize("name", ["falcon", "gpt_neox"])
def test_a_parallel_blocks_sum_travels_while_its_mlp_computes(name):
    """Attention and MLP both read the block's input (Falcon, GPT-NeoX): the attention's
    all-reduce is begun as its projection ends and waited for after the MLP, in the code a rank
    runs; with overlap=False, or with nothing to hide behind (Llama), it stays whole."""
    pytest.importorskip("transformers")
    lines = _hf_plan(name).rank_code(0).splitlines()
    starts = [i for i, line in enumerate(lines) if "fxpar.all_reduce_start(" in line]
    waits = [i for i, line in enumerate(lines) if "fxpar.wait(" in line]
    assert len(starts) == len(waits) == 2, (starts, waits)  # one per layer
    for a, b in zip(starts, waits):
        assert a < b and any("matmul(" in line or "linear(" in line for line in lines[a + 1:b]), lines[a:b + 1]
    assert "_start(" not in _hf_plan(name, overlap=False).rank_code(0)
    assert "_start(" not in _hf_plan("llama").rank_code(0)
    # backward's second forward of a recomputed block may stop between a start and its wait
    assert "_start(" not in _hf_plan(name, recompute="full").rank_code(0)


def _same_with_and_without(name, options):
    """Gradients with overlap on equal those with it off (each checked against one device
    elsewhere), and the collectives begun in the background are in the step's events."""
    model, ids, labels = hf_family(name)
    runs = {}
    for overlap in (False, True):
        pm = fxpar.parallelize(copy.deepcopy(model), fxpar.Mesh(tp=2), loss_fn=hf_loss, overlap=overlap, **options)
        for _ in range(2):
            pm.zero_grad()
            loss = pm.train_step(ids, labels=labels)
        runs[overlap] = (loss, {n: p.grad.clone() for n, p in pm.named_parameters()}, pm.step_events())
    (loss0, grads0, events0), (loss1, grads1, events1) = runs[False], runs[True]
    assert_close(loss1, loss0, f"{name} loss")
    for n, g in grads0.items():
        assert_close(grads1[n], g, f"{name} gradient of {n}")
    assert not [e for e in events0 if e[0].startswith("comm ")]
    forward = [(a, b) for n, a, b in events1 if n.startswith("F")]
    background = [(n, a, b) for n, a, b in events1 if n.startswith("comm tp ") and not n.endswith(" waited")]
    assert all(any(f0 <= a <= b <= f1 for f0, f1 in forward) for n, a, b in background if n.endswith("all_reduce"))
    return sorted({n for n, _, _ in background})


def test_collectives_in_the_background_over_processes(pools):
    pytest.importorskip("transformers")
    kinds = pools(2).run(_same_with_and_without, "falcon", {})
    assert kinds[0] == ["comm tp all_reduce"], kinds
    kinds = pools(2).run(_same_with_and_without, "llama", dict(sequence_parallel=True))
    # the collective matmuls' gathers and reduce-scatters, forward and backward
    assert kinds[0] == ["comm tp all_gather", "comm tp reduce_scatter"], kinds
