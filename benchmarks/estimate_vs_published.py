"""The cost model against published large runs: ``fxpar.estimate`` of each run's model, mesh,
batch and options on its GPUs, against the throughput its authors report.

    python benchmarks/estimate_vs_published.py     # about five minutes on 2 cores

The models are built on the meta device from their published shapes (fxpar's reference GPT and
Llama). Nothing is fitted: the device profiles come from datasheets and library benchmarks
(``fxpar/devices.py``). Reported figures: Megatron-LM's TFLOP/s per GPU count the recomputed
forward (our ``tflops_per_device``); MFU counts the model's FLOPs only (our ``mfu``). The
estimate is fxpar's own step: its collectives do not overlap computation yet (except zero 3's
prefetched gathers), where Megatron-LM and Llama 3's stack overlap the data-parallel reduction.
Stages hold equal numbers of layers, as the authors cut them. Llama 3 sharded gradients and
optimizer state over dp but reduced the gradients once per step (fxpar's zero 1 communicates that
way; its zero 2 reduce-scatters every microbatch), with an interleaved schedule whose number of
stages per rank the paper does not give (2 here).
"""

from __future__ import annotations

import os
import sys

from each_in_a_process import entry, in_process
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPT_VOCAB = 51200
RUNS = [
    dict(name="GPT 22B, 8 A100 (Korthikanti et al. 2022, Tables 3 and 5)", model="gpt",
         cfg=dict(n_layer=48, n_embd=6144, n_head=64), seq=2048, batch=4, device="a100-80gb",
         mesh=dict(tp=8), options=dict(microbatches=1, sequence_parallel=True, recompute="selective", precision="fp16"),
         reported=("mfu", 0.415)),
    dict(name="GPT-3 175B, 64 A100 (Korthikanti et al. 2022, Tables 3 and 5)", model="gpt",
         cfg=dict(n_layer=96, n_embd=12288, n_head=96), seq=2048, batch=64, device="a100-80gb",
         mesh=dict(pp=8, tp=8), options=dict(microbatches=64, sequence_parallel=True, recompute="selective",
                                              precision="fp16", schedule="interleaved", virtual=3),
         reported=("mfu", 0.514)),
    dict(name="GPT-3 175B, 1024 A100 (Megatron-LM README, pretrain_gpt3_175B.sh)", model="gpt",
         cfg=dict(n_layer=96, n_embd=12288, n_head=96), seq=2048, batch=1536, device="a100-80gb",
         mesh=dict(dp=8, pp=16, tp=8), options=dict(microbatches=192, recompute="full", precision="fp16"),
         reported=("tflops", 138.0)),
    dict(name="GPT 177B, 2304 H100 (Megatron-LM README, Megatron-Core scaling table)", model="gpt",
         cfg=dict(n_layer=96, n_embd=12288, n_head=96), seq=4096, batch=1152, device="h100-80gb", vocab=131072,
         mesh=dict(dp=48, pp=6, tp=8), options=dict(microbatches=24, sequence_parallel=True, zero=1, precision="bf16"),
         reported=("mfu", 0.44)),
    dict(name="Llama 3 405B, 8192 H100 (Llama 3 paper, Table 4)", model="llama",
         cfg=dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
                  vocab_size=128256, rope_theta=500000.0), seq=8192, batch=2048, device="h100-80gb",
         mesh=dict(dp=64, pp=16, tp=8), options=dict(microbatches=32, zero=1, precision="bf16", sequence_parallel=True,
                                                schedule="interleaved", virtual=2),
         reported=("mfu", 0.43)),
]


def one(index: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    import fxpar
    from fxpar.blocks import even_cuts
    from fxpar.capture import capture
    from fxpar.models import gpt, llama

    run = RUNS[index]
    with torch.device("meta"):
        if run["model"] == "gpt":
            model = gpt.GPT(gpt.GPTConfig(block_size=run["seq"], vocab_size=run.get("vocab", GPT_VOCAB), bias=False,
                                          **run["cfg"]))
        else:
            model = llama.Transformer(llama.ModelArgs(max_seq_len=run["seq"], **run["cfg"]))
    tokens = torch.zeros(run["batch"], run["seq"], dtype=torch.long, device="meta")
    target = torch.zeros(run["batch"], run["seq"], dtype=torch.long, device="meta")
    # stages of equal numbers of layers, as the authors cut them (fxpar's own cut evens out memory)
    stages = run["mesh"].get("pp", 1) * run["options"].get("virtual", 1)
    cuts = even_cuts(capture(model, (tokens[:1],)).gm, stages)
    est = fxpar.estimate(model, fxpar.Mesh(**run["mesh"]), (tokens,), device=run["device"], loss_fn=_loss,
                         example_target=target, split_points=cuts, **run["options"])
    return dict(step=est.step_time, mfu=est.mfu, tflops=est.tflops_per_device, peak=est.peak_memory,
                breakdown=est.breakdown)


def _loss(logits, target):
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def main(_args):
    rows = []
    for i, run in enumerate(RUNS):
        r = in_process(__file__, i)
        if "error" in r:
            rows.append([run["name"], "failed: " + r["error"]] + [""] * 5)
            continue
        kind, value = run["reported"]
        mine = r[kind]
        shown = (lambda v: f"{v:.1%}") if kind == "mfu" else (lambda v: f"{v:.0f} TFLOP/s")
        mesh = " x ".join(f"{k}={v}" for k, v in run["mesh"].items())
        top = sorted(((v, k) for k, v in r["breakdown"].items() if v), reverse=True)[:3]
        rows.append([run["name"], mesh, shown(value), shown(mine), f"{mine / value:.2f}", f"{r['step']:.3g}",
                     ", ".join(f"{k} {v:.3g}" for v, k in top)])
    print("fxpar.estimate against published runs (device profiles from datasheets; nothing fitted)")
    print(tabulate(rows, headers=["run", "mesh", "published", "estimate", "ratio", "step s", "largest parts (s)"],
                   disable_numparse=True))


if __name__ == "__main__":
    entry(lambda key: one(int(key)), main)
