"""Generation with the key/value cache at tp=2 on CPU processes (gloo), in one run: the reference
Llama on one process, under fxpar, and under DTensor tensor parallelism (``parallelize_module``
with column- and row-wise linears, the attention's head counts divided by hand as torchtitan and
gpt-fast do, the cache set up after that so that it holds the local heads).

    python benchmarks/generate_tp.py        # about a minute on 2 cores

Printed: the prompt's time, the time per new token, whether the tokens equal one process's, and
the bytes rank 0 sent per new token against the bound of tensor parallelism: two all-reduces of
``batch x dim`` values per layer per token (the vocabulary-parallel embedding's all-reduce and the
logits' gather come on top). Then the time per new token after a short and after a long prompt:
with the cache it stays; recomputing the whole prefix every step (one process, no cache) grows
with the prompt.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fxpar.local_ranks import spawn_local  # noqa: E402
from fxpar.generate_demo import timed, greedy, one_process, prompts  # noqa: E402

CONFIG = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1024, multiple_of=64, max_seq_len=256)
BATCH, PROMPT, NEW, TP = 4, 128, 32, 2
SHORT, AFTER = 8, 24  # a short prompt, and the tokens timed after each prompt


def _model():
    from fxpar.models import llama

    torch.manual_seed(0)
    model, _ = llama.build(**CONFIG)
    return model.eval()


def _rank(rank, world, how, results):
    import torch.distributed as dist

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    model = _model()
    ids = prompts(BATCH, PROMPT, CONFIG["vocab_size"])
    sent, lengths = None, None
    if how == "fxpar":
        model.setup_caches(BATCH, PROMPT + NEW)
        pm = fxpar.parallelize(model, fxpar.Mesh(tp=TP))
        pm.generate(ids, max_new_tokens=2)
        tokens, first, per_token = timed(lambda n: pm.generate(ids, max_new_tokens=n), NEW)
        counts = []
        for n in (NEW, 1):
            pm.reset_comm_bytes()
            pm.generate(ids, max_new_tokens=n)
            counts.append(sum(pm.comm_bytes().values()))
        sent = (counts[0] - counts[1]) / (NEW - 1)
        short = prompts(BATCH, SHORT, CONFIG["vocab_size"])
        pm.generate(short, max_new_tokens=2)  # its prompt's program
        lengths = {n: timed(lambda k, x=x: pm.generate(x, max_new_tokens=k), AFTER)[2]
                   for n, x in ((SHORT, short), (PROMPT, ids))}
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (TP,))
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel()}
        for layer in model.layers:
            parallelize_module(layer, mesh, plan)
            layer.attention.n_local_heads //= TP
            layer.attention.n_local_kv_heads //= TP
        model.setup_caches(BATCH, PROMPT + NEW)
        greedy(model, ids, 2)
        tokens, first, per_token = timed(lambda n: greedy(model, ids, n), NEW)
    if rank == 0:
        results.put(dict(tokens=tokens.tolist(), first=first, per_token=per_token, sent=sent,
                         lengths=lengths if how == "fxpar" else None))
    dist.destroy_process_group()


def _spawn(how):
    return spawn_local(_rank, TP, how)


def main():
    torch.set_num_threads(1)
    model = _model()
    model.setup_caches(BATCH, PROMPT + NEW)
    ids = prompts(BATCH, PROMPT, CONFIG["vocab_size"])
    tokens, first, per_token = one_process(model, ids, NEW)
    rows = [["1 process", f"{1000 * first:.1f}", f"{1000 * per_token:.2f}", "1.00", "", ""]]
    bound = 2 * CONFIG["n_layers"] * BATCH * CONFIG["dim"] * 4
    lengths = None
    for how in ("fxpar", "dtensor"):
        r = _spawn(how)
        same = "yes" if r["tokens"] == tokens.tolist() else "NO"
        sent = f"{r['sent'] / 1024:.1f} ({r['sent'] / bound:.2f}x)" if r["sent"] is not None else "-"
        rows.append([f"{how} tp={TP}", f"{1000 * r['first']:.1f}", f"{1000 * r['per_token']:.2f}",
                     f"{r['per_token'] / per_token:.2f}", same, sent])
        if r["lengths"]:
            lengths = r["lengths"]
    print(f"Llama {CONFIG}, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens (greedy), one thread per process, gloo")
    print(tabulate(rows, headers=["", "prompt ms", "ms / token", "vs 1 process", "tokens equal",
                                  f"KiB sent / token (bound {bound / 1024:.0f})"], disable_numparse=True))
    model.setup_caches(BATCH, PROMPT + NEW)
    again = {n: timed(lambda k, n=n: _recompute(model, prompts(BATCH, n, CONFIG["vocab_size"]), k), AFTER)[2]
             for n in (SHORT, PROMPT)}
    print(f"\nms per new token over {AFTER} tokens after a prompt of {SHORT} and of {PROMPT} tokens")
    print(tabulate([[f"fxpar tp={TP}, the cache", f"{1000 * lengths[SHORT]:.2f}", f"{1000 * lengths[PROMPT]:.2f}",
                     f"{lengths[PROMPT] / lengths[SHORT]:.2f}"],
                    ["1 process, the prefix again", f"{1000 * again[SHORT]:.2f}", f"{1000 * again[PROMPT]:.2f}",
                     f"{again[PROMPT] / again[SHORT]:.2f}"]],
                   headers=["", f"after {SHORT}", f"after {PROMPT}", "ratio"], disable_numparse=True))


def _recompute(model, ids, new: int) -> torch.Tensor:
    """Greedy tokens from the whole prefix at every step: no cache."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


if __name__ == "__main__":
    main()
