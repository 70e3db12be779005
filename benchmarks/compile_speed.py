"""Planning time at scale: ``fxpar.compile`` of Llama 3 8B / 70B / 405B shapes (on the meta device,
nothing allocated) at the meshes their authors trained on, against a bare ``torch.export`` of the
same model measured in the same process, with the peak resident memory of each.

    python benchmarks/compile_speed.py          # about three minutes on 2 cores

Each model runs in a process of its own (so its peak RSS is its own). The plan includes the
summary (every stage's memory, the schedule) as a user would print it.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from each_in_a_process import entry, in_process
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, model arguments, mesh, microbatches, sequence length)
CASES = [
    ("Llama 3 8B", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
     dict(tp=8), 1, 8192),
    ("Llama 3 70B", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
     dict(pp=8, tp=8), 8, 8192),
    ("Llama 3 405B", dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                          multiple_of=4096), dict(dp=32, pp=16, tp=8), 16, 8192),
]


def one(index: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    import fxpar
    from fxpar.models import llama

    name, cfg, mesh, m, seq = CASES[index]
    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs(vocab_size=128256, max_seq_len=seq, **cfg))
    mesh = fxpar.Mesh(**mesh)
    batch = m * mesh.replicas
    tokens = torch.randint(0, 128256, (batch, seq))
    t0 = time.perf_counter()
    torch.export.export(model, (torch.empty(1, seq, dtype=torch.long, device="meta"),), strict=False)  # a microbatch
    export = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = fxpar.compile(model, mesh, (tokens,), microbatches=m)
    plan.summary()
    planned = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(name=name, ranks=mesh.size, mesh=repr(mesh), export=export, compile=planned, rss=rss)


def main(_args):
    rows = []
    for i in range(len(CASES)):
        r = in_process(__file__, i)
        if "error" in r:
            raise SystemExit(f"{CASES[i][0]}: {r['error']}")
        rows.append([r["name"], r["mesh"], r["ranks"], f"{r['export']:.1f}", f"{r['compile']:.1f}",
                     f"{r['compile'] / r['export']:.2f}", f"{r['rss'] / 2**30:.2f}"])
    print("fxpar.compile (capture, plan, every rank's stages, summary) against a bare torch.export, meta device")
    print(tabulate(rows, headers=["model", "mesh", "ranks", "export s", "compile s", "ratio", "peak RSS GiB"],
                   disable_numparse=True))


if __name__ == "__main__":
    entry(lambda key: one(int(key)), main)
