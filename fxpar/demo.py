"""The demo: a GPT trained tensor-parallel over local CPU processes, against one process.

Each of ``tp`` processes joins a gloo process group, builds the same GPT from the same seed,
calls ``fxpar.parallelize`` and trains a few AdamW steps on a fixed batch. The parent trains the
same model in one process. The losses are printed side by side, and every rank's generated code
is written to ``out``.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=64)
BATCH, SEQ, LR = 4, 32, 3e-3


def _batch():
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _model():
    from fxpar.models import gpt

    torch.manual_seed(0)
    model, _ = gpt.build(**CONFIG)
    return model


def _loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _train(model, steps):
    idx, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        loss = _loss(model(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _rank(rank, tp, port, steps, results):
    import torch.distributed as dist

    import fxpar

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp, timeout=datetime.timedelta(seconds=120))
    idx, _ = _batch()
    t0 = time.perf_counter()
    pm = fxpar.parallelize(_model(), fxpar.Mesh(tp=tp), example_args=(idx,))
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = _train(pm, steps)
    step = (time.perf_counter() - t0) / steps
    local = sum(p.numel() for p in pm.parameters())
    if rank == 0:
        results.put((losses, build, step, local, pm.comm_bytes()))
    dist.destroy_process_group()


def main(tp: int = 2, steps: int = 5, out: str = "fxpar_out") -> int:
    import fxpar

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"GPT {CONFIG}, batch {BATCH}x{SEQ}, AdamW lr={LR}: {steps} steps on tp={tp} CPU processes (gloo) and on 1 process")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, tp, port, steps, results)) for r in range(tp)]
    for p in procs:
        p.start()
    losses, build, step, local, sent = results.get(timeout=600)
    for p in procs:
        p.join()
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    single = _train(model, steps)
    single_step = (time.perf_counter() - t0) / steps
    print(f"\n{'step':>4}  {'1 process':>12}  {f'tp={tp}':>12}  {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(single, losses)):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b):>9.2e}")
    worst = max(abs(a - b) for a, b in zip(single, losses))
    print(f"\nlosses match: {'yes' if worst < 1e-4 else 'NO'} (max |diff| {worst:.2e})")
    print(f"parameters per rank: {local:,} of {total:,} ({local / total:.2f}); parallelize took {build:.2f}s")
    print(f"step time: {1000 * step:.1f} ms at tp={tp}, {1000 * single_step:.1f} ms on 1 process (CPU: overhead, not speedup)")
    print("rank 0 sent per run: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sorted(sent.items())))
    idx, _ = _batch()
    plan = fxpar.compile(_model(), fxpar.Mesh(tp=tp), (idx,))
    paths = plan.dump(out)
    print(f"\nper-rank code and the plan were written to {os.path.abspath(out)}/:")
    for path in paths:
        print(f"  {path}")
    return 0 if worst < 1e-4 else 1
