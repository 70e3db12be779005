"""``python -m fxpar generate``: generation over local CPU processes against one process.

Each of ``tp x pp`` processes joins a gloo process group, builds the same model from the same seed,
parallelizes it and generates from the same random prompts with its key/value cache: once to
capture the prompt's and the token's programs, then timed. The parent makes the same tokens in
one process, with the model's own cache. Printed: whether the tokens agree, the prompt's time,
the time per new token and tokens per second, and the bytes one rank sent per new token.
"""

from __future__ import annotations

import datetime
import inspect
import time

import torch

from .local_ranks import spawn_local


def build(spec: str, settings, seed: int, batch: int, max_len: int):
    """The model of ``spec`` (see ``fxpar.cli.load_model``) in eval mode, with its cache set up
    where it keeps one itself (gpt-fast's ``setup_caches``)."""
    from .cli import load_model

    torch.manual_seed(seed)
    model, args = load_model(spec, settings)
    model.eval()
    if hasattr(model, "setup_caches"):
        model.setup_caches(batch, max_len)
    vocab = _vocab(model, args)
    return model, vocab


def _vocab(model, args) -> int:
    config = getattr(model, "config", None) or getattr(model, "params", None)
    if config is not None and hasattr(config, "vocab_size"):
        return int(config.vocab_size)
    return int(args[0].max()) + 1


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def one_process(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float, float]:
    """Greedy tokens with the model's own cache on one process: ``(tokens, prompt s, s per token)``."""
    with torch.no_grad():
        if "input_pos" in inspect.signature(model.forward).parameters:
            def run(n):
                return greedy(model, ids, n)
        else:
            def run(n):
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      min_new_tokens=n, pad_token_id=0)
        run(2)  # warm up
        return timed(run, new)


def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """``new`` greedy tokens after ``ids`` from a model that keeps its own cache and takes
    positions (gpt-fast's ``model(tokens, input_pos)``), on one process."""
    with torch.no_grad():
        logits = model(ids, input_pos=torch.arange(ids.shape[1]))[:, -1]
        out = [ids]
        for i in range(new):
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if i + 1 < new:
                logits = model(token, input_pos=torch.tensor([ids.shape[1] + i]))[:, -1]
        return torch.cat(out, dim=1)


def timed(run, new: int):
    """``run(n)`` makes the prompt's tokens and ``n`` new ones: ``(tokens of run(new), seconds of
    the prompt alone, seconds per new token after it)``."""
    t0 = time.perf_counter()
    run(1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = run(new)
    total = time.perf_counter() - t0
    return tokens, first, (total - first) / max(new - 1, 1)


def _rank(rank, world, a, results):
    import torch.distributed as dist

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    model, vocab = build(a["model"], a["set"], a["seed"], a["batch"], a["max_len"])
    ids = prompts(a["batch"], a["prompt_len"], vocab)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=a["tp"], pp=a["pp"]))
    pm.generate(ids, max_new_tokens=2)  # captures the prompt's and the token's programs
    tokens, first, per_token = timed(lambda n: pm.generate(ids, max_new_tokens=n), a["new"])
    sent = []
    for n in (a["new"], 1):  # with every new token, and the prompt alone
        pm.reset_comm_bytes()
        pm.generate(ids, max_new_tokens=n)
        sent.append(sum(pm.comm_bytes().values()))
    if rank == 0:
        results.put(dict(tokens=tokens.tolist(), first=first, per_token=per_token, sent=sent[0],
                         sent_per_token=(sent[0] - sent[1]) / max(a["new"] - 1, 1)))
    dist.destroy_process_group()


def main(model: str = "llama", tp: int = 2, pp: int = 1, prompt_len: int = 64, new: int = 32, batch: int = 1,
         settings=None, seed: int = 0) -> int:
    world = tp * pp
    max_len = prompt_len + new
    a = dict(model=model, set=settings, seed=seed, batch=batch, max_len=max_len, prompt_len=prompt_len, new=new,
             tp=tp, pp=pp)
    print(f"{model}: batch {batch}, prompt {prompt_len} tokens, {new} new (greedy), on tp={tp} pp={pp} CPU processes "
          "(gloo) and on 1 process")
    r = spawn_local(_rank, world, a)
    single, ref = build(model, settings, seed, batch, max_len)
    ids = prompts(batch, prompt_len, ref)
    tokens, first, per_token = one_process(single, ids, new)
    same = tokens.tolist() == r["tokens"]
    print(f"\n{'':<12}{'prompt ms':>12}{'ms / token':>12}{'tokens / s':>12}")
    for name, f, t in (("1 process", first, per_token), (f"tp={tp} pp={pp}", r["first"], r["per_token"])):
        print(f"{name:<12}{1000 * f:>12.1f}{1000 * t:>12.2f}{batch / t:>12.1f}")
    print(f"\ntokens match: {'yes' if same else 'NO'}")
    print(f"rank 0 sent {r['sent_per_token'] / 1024:.1f} KiB per new token ({r['sent'] / 1024:.1f} KiB in all)")
    return 0 if same else 1
