"""Generation through a pipeline with several groups of requests in flight, in one run: a Hugging
Face Llama (random weights, built from its config) over pp=2 CPU processes (gloo), with the batch
as 1, 2 and 4 microbatches, each reading and writing its own rows of the key/value cache. With
one, a stage waits while the other works on the token; with more, both work at once.

    python benchmarks/generate_pp.py        # about a minute on 2 cores

Printed: the time per new token of the batch, tokens per second, and the bubble the forward
schedule leaves per token ((p-1)/(m+p-1)).
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
from fxpar.generate_demo import prompts, timed  # noqa: E402

CONFIG = dict(vocab_size=1024, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256)
BATCH, PROMPT, NEW, PP = 16, 32, 24, 2


def _model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, **CONFIG)
    return transformers.LlamaForCausalLM(cfg).eval()


def _rank(rank, world, microbatches, results):
    import torch.distributed as dist

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    ids = prompts(BATCH, PROMPT, CONFIG["vocab_size"])
    pm = fxpar.parallelize(_model(), fxpar.Mesh(pp=PP), microbatches=microbatches)
    pm.generate(ids, max_new_tokens=2)
    tokens, first, per_token = timed(lambda n: pm.generate(ids, max_new_tokens=n), NEW)
    if rank == 0:
        results.put(dict(tokens=tokens.tolist(), first=first, per_token=per_token))
    dist.destroy_process_group()


def _spawn(microbatches):
    return spawn_local(_rank, PP, microbatches)


def main():
    rows, first_tokens = [], None
    for m in (1, 2, 4):
        r = _spawn(m)
        first_tokens = first_tokens or r["tokens"]
        rows.append([m, f"{1000 * r['first']:.1f}",
                     f"{1000 * r['per_token']:.1f}", f"{BATCH / r['per_token']:.0f}",
                     f"{(PP - 1) / (m + PP - 1):.2f}", "yes" if r["tokens"] == first_tokens else "NO"])
    print(f"Hugging Face Llama {CONFIG}, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens (greedy), pp={PP}, "
          "one thread per process, gloo")
    print(tabulate(rows, headers=["microbatches", "prompt ms", "ms / token", "tokens / s", "bubble",
                                  "tokens as m=1"], disable_numparse=True))


if __name__ == "__main__":
    main()
