"""``fxpar.autoplan``'s choices for Llama 3 8B / 70B / 405B on 8 / 64 / 1024 / 4096 H100s
(8192-token sequences), beside the meshes their authors published, with the time the search took.

    python benchmarks/autoplan_llama.py [8B|70B|405B ...]    # minutes per model on 2 cores

Each model runs in a process of its own; its one-sample plans are reused over the four world
sizes. Global batches: 32, 256, 1024 and 2048 sequences (Llama 3 405B trained on 16M-token
batches, 2048 sequences of 8192).
"""

from __future__ import annotations

import os
import sys
import time

from each_in_a_process import entry, in_process
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8192
MODELS = {
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "405B": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096),
}
WORLDS = {8: 32, 64: 256, 1024: 1024, 4096: 2048}  # devices -> global batch (sequences)
PUBLISHED = {  # where the authors published a mesh for this model (and about this many GPUs): (source, its tp x pp)
    ("8B", 8): ("FSDP 8 (torchtitan, 8 H100)", dict(tp=1, pp=1)),
    ("70B", 64): ("FSDP 32 x TP 8 on 256 H100 (torchtitan)", dict(tp=8, pp=1)),
    ("405B", 1024): ("FSDP 8 x TP 8 x PP 8 on 512 H100 (torchtitan)", dict(tp=8, pp=8)),
    ("405B", 4096): ("TP 8 x PP 16 x DP 64 on 8192 H100 (Llama 3 paper, Table 4)", dict(tp=8, pp=16)),
}


def one(name: str) -> list:
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    import fxpar
    from fxpar.models import llama

    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs(vocab_size=128256, max_seq_len=SEQ, **MODELS[name]))
    sample = torch.zeros(1, SEQ, dtype=torch.long, device="meta")

    def loss(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def search(world, batch, **fixed):
        return fxpar.autoplan(model, world_size=world, device="h100-80gb", global_batch=batch, example_args=(sample,),
                              loss_fn=loss, example_target=sample, verbose=False, **fixed)

    out = []
    for world, batch in WORLDS.items():
        t0 = time.perf_counter()
        found = search(world, batch)
        took = time.perf_counter() - t0
        if not found:
            out.append(dict(world=world, batch=batch, mesh="none fits", took=took, why=found.rejected[0][1]))
            continue
        best = found[0]
        row = dict(world=world, batch=batch, mesh=repr(best.mesh), took=took, options=_shown(best.options),
                   step=best.estimate.step_time, mfu=best.estimate.mfu, peak=best.estimate.peak_memory)
        if (name, world) in PUBLISHED:  # the authors' tp x pp, with the best options the planner finds for it
            theirs = search(world, batch, **PUBLISHED[name, world][1])
            row["theirs"] = (f"{theirs[0].mesh} {_shown(theirs[0].options)}: {theirs[0].estimate.step_time:.3g} s"
                             if theirs else "does not fit: " + theirs.rejected[0][1])
        out.append(row)
    return out


def _shown(options: dict) -> str:
    shown = ("microbatches", "zero", "recompute")  # the rest: sequence parallel with tp, bf16, 1f1b, even stages
    return ", ".join(f"{k}={options[k]}" for k in shown)


def main(names):
    rows = []
    for name in names:
        found = in_process(__file__, name)
        if "error" in found:
            rows.append([name, "failed: " + found["error"]])
            continue
        for r in found:
            if "step" not in r:
                rows.append([name, r["world"], r["batch"], r["mesh"], r["why"], "", "", "", f"{r['took']:.0f}"])
                continue
            rows.append([name, r["world"], r["batch"], r["mesh"], r["options"], f"{r['step']:.3g}", f"{r['mfu']:.1%}",
                         f"{r['peak'] / 2**30:.0f}", f"{r['took']:.0f}"])
            if "theirs" in r:
                rows.append(["", "", "", "published: " + PUBLISHED[name, r["world"]][0], r["theirs"]] + [""] * 4)
    print("fxpar.autoplan, Llama 3 on H100-80GB (bf16, 8192-token sequences), best candidate; under it, the")
    print("published tp x pp with the best options the planner finds for it")
    print(tabulate(rows, headers=["model", "GPUs", "batch", "mesh", "options", "step s", "MFU", "peak GiB", "search s"],
                   disable_numparse=True, maxcolwidths=[None, None, None, 40, 60]))


if __name__ == "__main__":
    entry(one, lambda names: main(names or list(MODELS)))
