"""Memory at scale, from fxpar's memory model (models on the meta device, nothing allocated):

1. bytes per parameter per rank of a 1B-shaped Llama (Llama 3.2 1B: 16 layers, dim 2048, 32 heads,
   8 key/value heads) at dp=8, zero 0/1/2/3 x fp32/bf16, next to ZeRO's and Megatron's formulas;
2. the largest Llama (layers x dim) that fits 80 GiB per device on 64 devices (tp=8 inside a node),
   bf16 with fp32 masters and AdamW, at the best zero stage and pipeline depth;
3. activations per transformer layer with recompute none/selective/full next to Korthikanti et
   al.'s formulas, and what recompute="auto" chooses under a memory limit between them.

    python benchmarks/memory_at_scale.py        # about two minutes on 2 cores
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
from fxpar.errors import module_path  # noqa: E402
from fxpar.memory import stage_memory  # noqa: E402
from fxpar.models import gpt, llama  # noqa: E402
from fxpar.planning import plan_graph  # noqa: E402

GIB = 1 << 30
LLAMA_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                ffn_dim_multiplier=1.5, max_seq_len=4096)


def _llama(**cfg):
    with torch.device("meta"):
        return llama.Transformer(llama.ModelArgs(**cfg))


def formulas(d: int) -> dict:
    """Bytes per parameter per rank: (ZeRO paper, 16-bit gradients; Megatron, fp32 main gradients)."""
    return {("fp32", 0): (16, 16), ("fp32", 1): (4 + 4 + 8 / d, 4 + 4 + 8 / d), ("fp32", 2): (4 + 12 / d, 4 + 12 / d),
            ("fp32", 3): (16 / d, 16 / d),
            ("bf16", 0): (16, 18), ("bf16", 1): (4 + 12 / d, 6 + 12 / d), ("bf16", 2): (2 + 14 / d, None),
            ("bf16", 3): (16 / d, 18 / d)}


def bytes_per_parameter(d: int = 8, seq: int = 2048) -> None:
    cap = capture(_llama(**LLAMA_1B), (torch.randint(0, 128256, (1, seq)),))
    ref = formulas(d)
    rows = []
    for precision in ("fp32", "bf16"):
        cap_p = cap if precision == "fp32" else capture(_llama(**LLAMA_1B), (torch.randint(0, 128256, (1, seq)),),
                                                        dtype=torch.bfloat16)
        for zero in (0, 1, 2, 3):
            _, ctx = plan_graph(cap_p, fxpar.Mesh(dp=d), zero=zero, precision=precision)
            m = ctx.pipeline.stages[0].memory.at(ctx.pipeline.sizes, ctx.dim_names)
            per = (m.params + m.masters + m.grads + m.optimizer) / m.weights
            zero_ref, megatron = ref[(precision, zero)]
            rows.append([precision, zero, f"{m.params / m.weights:.2f}", f"{m.masters / m.weights:.2f}",
                         f"{m.grads / m.weights:.2f}", f"{m.optimizer / m.weights:.2f}", f"{per:.2f}",
                         f"{zero_ref:.2f}", "-" if megatron is None else f"{megatron:.2f}",
                         f"{m.gathered / 2**20:.0f} MiB"])
    print(f"Llama 3.2 1B shape at dp={d}, AdamW: bytes per parameter on each rank (fxpar's memory model)")
    print(tabulate(rows, headers=["precision", "zero", "weights", "fp32 masters", "grads", "optimizer", "total",
                                  "ZeRO formula", "Megatron formula", "whole at once"], disable_numparse=True))


def _config(dim: int, seq: int) -> dict:
    """A Llama 3 shape of width ``dim``: 128-wide heads, 8 key/value heads."""
    return dict(dim=dim, n_heads=dim // 128, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3,
                max_seq_len=seq)


def _llama_params(dim: int, layers: int) -> int:
    """Parameters of a ``layers``-layer Llama of width ``dim``, counted off a 1-layer meta model."""
    one = _llama(n_layers=1, **_config(dim, 128))
    layer = sum(p.numel() for p in one.layers[0].parameters())
    return sum(p.numel() for p in one.parameters()) + (layers - 1) * layer


def _per_layer(dim: int, dp: int, tp: int, zero: int, seq: int, recompute: str):
    """(static, activations per microbatch) bytes on one device: the embedding and head part, and
    one layer's, from plans of 2 and 3 layers (the memory model is linear in the layers; a run of
    two is what "full" recomputation finds layers by)."""
    out = []
    for n in (2, 3):
        model = _llama(n_layers=n, **_config(dim, seq))
        cap = capture(model, (torch.randint(0, 128256, (1, seq)),), dtype=torch.bfloat16)
        _, ctx = plan_graph(cap, fxpar.Mesh(dp=dp, tp=tp), zero=zero, precision="bf16", recompute=recompute,
                            sequence_parallel=tp > 1)
        m = ctx.pipeline.stages[0].memory.at(ctx.pipeline.sizes, ctx.dim_names)
        out.append((m.static + m.gathered, m.activations_per_microbatch + m.recomputed))
    (s2, a2), (s3, a3) = out
    return (s2 - 2 * (s3 - s2), a2 - 2 * (a3 - a2)), (s3 - s2, a3 - a2)


def largest_model(devices: int = 64, tp: int = 8, seq: int = 4096, limit: float = 80 * GIB) -> None:
    """For each width, the most layers whose busiest device fits ``limit`` under 1F1B with
    microbatches of one sequence, over pipeline depths, zero stages and recomputation: the first
    stage keeps pp microbatches in flight and holds the embedding, the last holds the head (each
    end counted with the whole embedding-and-head part, an upper bound)."""
    rows = []
    for dim in (8192, 16384, 24576):
        best = None
        for pp in (1, 2, 4, 8):
            dp = devices // (tp * pp)
            for zero in (1, 3):
                for recompute in ("selective", "full"):
                    (s0, a0), (sl, al) = _per_layer(dim, dp, tp, zero, seq, recompute)

                    def peak(layers):  # the first stage: layers / pp of them, pp microbatches in flight
                        return s0 + layers / pp * sl + pp * (a0 + layers / pp * al)

                    layers = 0
                    while peak(layers + pp) <= limit:
                        layers += pp
                    if layers and (best is None or layers > best[0]):
                        best = (layers, pp, dp, zero, recompute, peak(layers))
        if best:
            layers, pp, dp, zero, recompute, most = best
            params = _llama_params(dim, layers)
            rows.append([dim, layers, f"{params / 1e9:.0f}B", f"dp={dp} pp={pp} tp={tp}", zero, recompute,
                         f"{most / GIB:.1f}"])
    print(f"\nLargest Llama (dim, layers) whose busiest device fits {limit / GIB:.0f} GiB on {devices} devices: "
          f"bf16 + fp32 masters + AdamW, sequence parallel, 1F1B, microbatch 1 x {seq} tokens")
    print(tabulate(rows, headers=["dim", "layers", "parameters", "mesh", "zero", "recompute", "busiest GiB"],
                   disable_numparse=True))


def recompute_per_layer(h: int = 2048, a: int = 16, s: int = 2048, b: int = 1) -> None:
    rows = []
    for tp in (1, 8):
        with torch.device("meta"):
            model, _ = gpt.build(n_embd=h, n_head=a, block_size=s, n_layer=2, flash=False, dropout=0.1,
                                 vocab_size=32000)
        model = model.to(torch.bfloat16)
        cap = capture(model, (torch.randint(0, 32000, (b, s)),))
        t = tp
        body = 34 if t == 1 else 10 + 24 / t
        formula = {"none": s * b * h * (body + 5 * a * s / (h * t)), "selective": s * b * h * body, "full": 2 * s * b * h}
        peaks = {}
        for mode in ("none", "selective", "full"):
            gm, ctx = plan_graph(cap, fxpar.Mesh(tp=tp), recompute=mode)
            layer, flops = _layer(gm, ctx)
            peaks[mode] = ctx.pipeline.stages[0].memory.peak
            rows.append([tp, mode, f"{layer / 2**20:.1f}", f"{formula[mode] / 2**20:.1f}", f"{layer / formula[mode]:.3f}",
                         f"{flops / 1e9:.1f}", f"{peaks[mode] / 2**20:.0f}"])
        limit = (peaks["selective"] + peaks["full"]) // 2
        gm, ctx = plan_graph(cap, fxpar.Mesh(tp=tp), recompute="auto", memory_limit=limit)
        layer, flops = _layer(gm, ctx)
        rows.append([tp, f"auto (limit {limit / 2**20:.0f} MiB)", f"{layer / 2**20:.1f}", "", "", f"{flops / 1e9:.1f}",
                     f"{ctx.pipeline.stages[0].memory.peak / 2**20:.0f}"])
    print(f"\nOne GPT layer (h={h}, a={a}, s={s}, b={b}, bf16, dropout on): activations kept for backward "
          "against Korthikanti et al., forward GFLOPs recomputed per step, peak of the whole 2-layer model")
    print(tabulate(rows, headers=["tp", "recompute", "MiB kept", "formula MiB", "ratio", "GFLOP recomputed",
                                  "peak MiB"], disable_numparse=True))


def _layer(gm, ctx):
    """What the first layer keeps for backward, and the FLOPs the whole model recomputes."""
    nodes = {n.name: n for n in gm.graph.nodes}
    layer = [n for n in nodes.values() if module_path(n).startswith("transformer.h.0")]
    return stage_memory(layer, nodes).activations_per_microbatch, ctx.pipeline.stages[0].memory.recompute_flops


if __name__ == "__main__":
    bytes_per_parameter()
    largest_model()
    recompute_per_layer()
