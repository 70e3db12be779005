"""Stage balance of a 32-layer, 4096-wide Llama (7B) on the meta device under 1F1B: fxpar's cut by
estimated peak memory against cutting into equal numbers of layers (what Megatron's and
torchtitan's layer counts do), by the same memory model.

    python benchmarks/stage_balance.py        # about a minute

The first 1F1B stage keeps p microbatches of activations and the last one, so equal layer counts
overload the first stages; fxpar gives them fewer layers.
"""

from __future__ import annotations

import os
import sys

import torch
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxpar  # noqa: E402
from fxpar.capture import capture  # noqa: E402
from fxpar.planning import plan_graph  # noqa: E402
from fxpar.models import llama  # noqa: E402

GIB = 1 << 30


def main(microbatch=(1, 2048), microbatches=8):
    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs())
    layers = model.params.n_layers
    cap = capture(model, (torch.randint(0, 32000, microbatch),))
    rows = []
    for pp in (2, 4, 8):
        per = layers // pp
        for label, options in (
            ("fxpar (by memory)", {}),
            (f"equal layers ({per} per stage)", {"split_points": [f"layers.{per * k}" for k in range(1, pp)]}),
        ):
            _, ctx = plan_graph(cap, fxpar.Mesh(pp=pp), schedule="1f1b", microbatches=microbatches, **options)
            peaks = [s.memory.peak / GIB for s in ctx.pipeline.stages]
            mean = sum(peaks) / pp
            rows.append([pp, label, " ".join(f"{x:.1f}" for x in peaks), f"{max(peaks):.1f}", f"{max(peaks) / mean:.3f}"])
    print(f"Llama 7B (32 layers, dim 4096), fp32 weights + AdamW, microbatch {microbatch[0]}x{microbatch[1]} tokens, "
          f"1F1B with {microbatches} microbatches: estimated peak GiB per device, stage by stage")
    print(tabulate(rows, headers=["pp", "cut", "peak per stage (GiB)", "max", "max/mean"], disable_numparse=True))


if __name__ == "__main__":
    main()
