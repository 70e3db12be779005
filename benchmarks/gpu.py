"""fxpar on one GPU: a Llama-shaped model trained in bf16 with fp32 master weights, as a plan over
an NCCL world of one, next to eager PyTorch under ``torch.autocast`` and ``torch.compile``d eager.

    python benchmarks/gpu.py                      # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --dim 128 --layers 2 --seq 64 --steps 3    # the same path on gloo

Each setting starts from the same weights and data and trains ``--steps`` AdamW steps. Printed per
setting: the median step time, tokens per second, achieved TFLOP/s of model FLOPs (forward and
backward, counted by ``torch.utils.flop_counter`` on the eager model: PaLM's MFU convention, no
recomputation), MFU against the device's dense bf16 peak, peak GPU memory, and the largest gap of
its losses from eager autocast's. fxpar's layers compute every op in bf16 while autocast keeps
some in fp32 (reductions, norms), so the losses agree to bf16's precision, not bit for bit; the
check is that the gap stays within ``--tolerance`` (relative) over the steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxpar  # noqa: E402
from fxpar.models import llama  # noqa: E402

# dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts without sparsity)
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK.items() if k in name), None)


def loss_fn(out, target):
    return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())


def model_flops(model, tokens, target) -> float:
    """FLOPs of one forward and backward of the eager model (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        loss_fn(m(tokens), target).backward()
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(step, device, steps: int):
    """Run ``step`` (returns the loss) ``steps`` times; the losses and the median time of the
    steps after the first two (compilation, first-touch allocations)."""
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(float(step()))
        _sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[2:] or times
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return losses, statistics.median(timed), memory


def eager(model, tokens, target, device, steps, compiled=False):
    model = copy.deepcopy(model).to(device)
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(run(tokens), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return train(step, device, steps)


def parallel(model, tokens, target, device, steps, **options):
    pm = fxpar.parallelize(copy.deepcopy(model), fxpar.Mesh(dp=1), example_args=(tokens,), loss_fn=loss_fn,
                           example_target=target, device=device, precision="bf16", **options)
    assert {p.dtype for p in pm.parameters()} == {torch.float32}, "the optimizer steps fp32 masters"
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        loss = pm.train_step(tokens, target=target)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return train(step, device, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)

    torch.manual_seed(0)
    cfg = llama.ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                          vocab_size=args.vocab, max_seq_len=args.seq)
    model = llama.Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    target = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    flops = model_flops(model.to(device), tokens, target)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(device)

    runs = {"eager, autocast bf16": eager(model, tokens, target, device, args.steps),
            "torch.compile, autocast bf16": eager(model, tokens, target, device, args.steps, compiled=True),
            "fxpar, precision='bf16'": parallel(model, tokens, target, device, args.steps),
            "fxpar, precision='bf16', compile=True": parallel(model, tokens, target, device, args.steps, compile=True)}
    reference = runs["eager, autocast bf16"][0]
    rows, worst = [], 0.0
    for name, (losses, seconds, memory) in runs.items():
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        if name.startswith("fxpar"):
            worst = max(worst, gap)
        achieved = flops / seconds
        rows.append([name, f"{seconds * 1e3:.1f}", f"{args.batch * args.seq / seconds:,.0f}", f"{achieved / 1e12:.1f}",
                     "-" if peak is None else f"{achieved / peak:.1%}",
                     "-" if memory is None else f"{memory / 2**30:.2f}", f"{gap:.2e}", f"{losses[-1]:.4f}"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Llama ({args.layers} layers, dim {args.dim}, {args.heads} heads, {args.kv_heads} kv heads, "
          f"{params / 1e9:.2f}B parameters), batch {args.batch}x{args.seq}, AdamW, {args.steps} steps on {where}; "
          f"{flops / 1e12:.1f} TFLOP per step")
    print(tabulate(rows, headers=["", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "loss gap vs eager",
                                  "last loss"], disable_numparse=True))
    dist.destroy_process_group()
    if worst > args.tolerance:
        raise SystemExit(f"fxpar's losses left eager autocast's by {worst:.2e} (relative), over {args.tolerance}")


if __name__ == "__main__":
    main()
