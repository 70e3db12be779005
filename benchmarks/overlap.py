"""Communication overlapped with computation, in one run: step time with ``overlap=True`` (the
default) against ``overlap=False``, over gloo processes, for

* dp=2: each bucket's gradient all-reduce begun while backward goes on, against DDP
  (``torch.nn.parallel.DistributedDataParallel``, whose buckets overlap the same way);
* tp=2 with sequence parallelism: the collective matmuls (this rank's tokens computed while the
  others' travel), against DTensor's tensor and sequence parallelism (``parallelize_module`` with
  torchtitan's plan; its async-TP needs CUDA symmetric memory);
* tp=2 on a model whose attention and MLP read the same input (GPT-NeoX's parallel residual,
  from ``transformers``): the attention's all-reduce waited for after the MLP.

    python benchmarks/overlap.py          # a few minutes on 2 cores

Printed: ms per training step (forward, backward, gradient reduction; no optimizer), the median
of the steps after two warm-ups, and the share of the background collectives' time in flight
that the rank spent computing rather than waiting (dp: the share of the all-reduce time that ran
beside backward, from the actions' clocks).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_tp import CFG  # noqa: E402
from benchmarks.zero_bubble import BATCH, LAYERS, loss_fn, make, timed  # noqa: E402
from fxpar.local_ranks import spawn_each  # noqa: E402

CONFIG = {**CFG, "n_layers": LAYERS, "batch": BATCH}


def _parallel_residual():
    """GPT-NeoX (attention and MLP beside each other in every block), small, random weights."""
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=CFG["vocab"], hidden_size=CFG["dim"], num_hidden_layers=LAYERS,
                                     num_attention_heads=CFG["n_heads"], intermediate_size=CFG["hidden"],
                                     max_position_embeddings=CFG["seq"], use_parallel_residual=True, use_cache=False,
                                     hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg)
    _, tokens, targets = make()
    return model, tokens, targets, lambda out, target: loss_fn(out.logits, target)


def _hidden(events, mesh) -> float | None:
    """The share of the background collectives' time in flight not spent waiting for them."""
    if mesh.dp > 1:
        comm = [(a, b) for name, a, b in events if name.startswith("comm dp")]
        backward_end = max((b for name, _, b in events if name[0] in "BW"), default=0.0)
        hidden = sum(max(0.0, min(b, backward_end) - a) for a, b in comm)
        total = sum(b - a for a, b in comm)
        return hidden / total if total else None
    flight = sum(b - a for name, a, b in events if name.startswith("comm ") and not name.endswith(" waited"))
    waited = sum(b - a for name, a, b in events if name.startswith("comm ") and name.endswith(" waited"))
    return 1 - waited / flight if flight else None


def fxpar_main(rank, world, case, iters):
    import torch.distributed as dist

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = fxpar.Mesh(**({"dp": 2} if case == "dp" else {"tp": 2}))
    model, tokens, targets, loss = _parallel_residual() if case == "parallel" else (*make(), loss_fn)
    dp = mesh.coordinate(rank)["dp"]
    tokens, targets = tokens.chunk(mesh.dp)[dp], targets.chunk(mesh.dp)[dp]
    out = {}
    for overlap in (False, True):
        pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_args=(tokens,), loss_fn=loss, overlap=overlap,
                               sequence_parallel=case == "sp")

        def step():
            pm.train_step(tokens, target=targets)
            pm.zero_grad()

        t = timed(step, iters)
        out[overlap] = (t, _hidden(pm.step_events(), mesh))
    if case == "dp":  # DDP, the same replicas
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))

        def ddp_step():
            loss_fn(ddp(tokens), targets).backward()
            ddp.zero_grad()

        out["peer"] = (timed(ddp_step, iters), None)
    if case == "sp":  # DTensor's tensor and sequence parallelism, the same model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from benchmarks.bench_tp import dtensor_sp_plan

        peer = copy.deepcopy(model)
        parallelize_module(peer, init_device_mesh("cpu", (world,)), dtensor_sp_plan(peer))

        def dtensor_step():
            loss_fn(peer(tokens), targets).backward()
            peer.zero_grad()

        try:
            out["peer"] = (timed(dtensor_step, iters), None)
        except Exception as e:  # noqa: BLE001 - reported in the table instead of a time
            out["peer"] = (None, f"{type(e).__name__}")
    dist.destroy_process_group()
    return out


CASES = {
    "dp": ("dp=2", "DDP"),
    "sp": ("tp=2, sequence parallel", "DTensor TP+SP"),
    "parallel": ("tp=2, parallel attention + MLP (GPT-NeoX)", ""),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    rows = []
    for case, (name, peer_name) in CASES.items():
        results = spawn_each(fxpar_main, 2, case, a.iters, timeout=1200)
        if any(isinstance(r, str) for r in results):
            raise RuntimeError(str(results))
        t_off, t_on = (max(r[o][0] for r in results) for o in (False, True))
        hidden = results[0][True][1]
        peer = ""
        if "peer" in results[0]:
            times = [r["peer"][0] for r in results]
            peer = f"{peer_name} fails: {results[0]['peer'][1]}" if None in times else \
                f"{peer_name} {1e3 * max(times):.1f} ({max(times) / t_on:.2f}x)"
        rows.append([name, f"{1e3 * t_off:.1f}", f"{1e3 * t_on:.1f}", f"{t_off / t_on:.2f}x",
                     f"{hidden:.0%}" if hidden is not None else "no background collectives", peer])
    print(f"model {CONFIG}; gloo, 1 thread per rank, {os.cpu_count()} cores")
    print(tabulate(rows, headers=["mesh", "overlap=False ms", "overlap=True ms", "speedup",
                                  "background time not waited", "peer ms (vs fxpar overlap)"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
