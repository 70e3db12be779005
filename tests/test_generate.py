"""Generation with a key/value cache: the cache is placed like the keys and values written into
it (a rank holds its own heads), ``pm.generate`` makes the tokens one process makes recomputing the
whole prefix every step, from two programs captured once each, on every rank alike."""

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.errors import FxparError, PlanError
from fxpar.models import gpt, llama
from fxpar.runtime.generate import pick
from tests.zoo import FAMILIES, MOE_FAMILIES

PROMPT, NEW, MAX_LEN = 6, 8, 32


def _model(kv_heads: int = 2, cached: bool = True, name: str = "llama"):
    torch.manual_seed(0)
    if name == "gpt":
        model, (tokens,) = gpt.build(flash=kv_heads != 1)  # the matmul-softmax attention too
    else:
        model, (tokens,) = llama.build(n_layers=2, n_heads=4, n_kv_heads=kv_heads)
    model.eval()
    if cached:
        model.setup_caches(tokens.shape[0], MAX_LEN)
    return model, tokens[:, :PROMPT]


def _recomputed(model, prompt, new: int = NEW) -> torch.Tensor:
    """Greedy tokens from the whole prefix at every step: no cache at all."""
    seq = prompt
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("kv_heads, tp, local_heads", [(2, 2, 1), (1, 2, 1), (2, 4, 1)])
def test_the_cache_holds_each_ranks_own_key_value_heads(kv_heads, tp, local_heads):
    model, prompt = _model(kv_heads)
    positions = torch.arange(PROMPT)
    with torch.no_grad():
        expect = model(prompt, positions)
        model.setup_caches(prompt.shape[0], MAX_LEN)  # empty again
        plan = fxpar.compile(model, fxpar.Mesh(tp=tp), (prompt, positions))
        got = plan.simulate(prompt, positions)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    caches = {t: p for t, p in plan.ctx.param_placements.items() if "cache" in t}
    assert len(caches) == 4
    for target, place in caches.items():
        assert place.local_size == local_heads, f"{target} is stored {place}, not by key/value head"


def test_the_cache_is_counted_and_sized():
    model, prompt = _model(kv_heads=2)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (prompt, torch.arange(PROMPT)))
    m = plan.device_memory()[0]
    batch, head_dim = prompt.shape[0], 64 // 4
    per_position = 2 * 2 * batch * 1 * head_dim * 4  # 2 layers x (keys, values) x batch x 1 head of 2 x fp32
    assert m.cache == per_position * MAX_LEN and m.cache_per_position == per_position
    assert "kv cache" in plan.summary()
    weights = m.params + m.buffers - m.cache
    assert plan.max_cache(weights + 10 * per_position) == 10
    assert plan.max_cache(weights + 10 * per_position - 1) == 9
    assert plan.max_cache(weights // 2) == 0


def _generate(mesh: dict, kv_heads: int, name: str) -> dict:
    model, prompt = _model(kv_heads, cached=False, name=name)
    expect = _recomputed(model, prompt)
    model.setup_caches(prompt.shape[0], MAX_LEN)
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh))
    greedy = pm.generate(prompt, max_new_tokens=NEW)
    programs = len(pm._programs)
    sampled = pm.generate(prompt, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    return dict(greedy=greedy, expect=expect, programs=programs, sampled=sampled,
                programs_after=len(pm._programs))


@pytest.mark.parametrize("world, mesh, kv_heads, name", [
    (2, dict(tp=2), 2, "llama"), (2, dict(tp=2), 1, "llama"), (4, dict(pp=2, tp=2), 2, "llama"),
    (2, dict(tp=2), 4, "gpt"), (2, dict(tp=2), 1, "gpt"),
], ids=["llama-tp2", "llama-tp2-one-kv-head", "llama-pp2xtp2", "gpt-tp2", "gpt-tp2-matmul-attention"])
def test_greedy_tokens_are_those_of_one_process_without_a_cache(pools, world, mesh, kv_heads, name):
    out = pools(world).run(_generate, mesh, kv_heads, name)
    for rank, r in enumerate(out):
        assert torch.equal(r["greedy"], r["expect"]), f"rank {rank}: {r['greedy'].tolist()} != {r['expect'].tolist()}"
        # the prompt's program and the one-token program, captured once each
        assert r["programs"] == 2 and r["programs_after"] == 2
        assert torch.equal(r["sampled"], out[0]["sampled"]), f"rank {rank} drew other tokens than rank 0"
        assert torch.equal(r["sampled"][:, :PROMPT], r["expect"][:, :PROMPT])


# partial rotary, and a sequence that makes the config's eos (0) without being asked to stop there
EXTRA = {"phi": ("PhiConfig", "PhiForCausalLM", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                     num_attention_heads=4, max_position_embeddings=32))}
KNOWN = {**FAMILIES, **MOE_FAMILIES, **EXTRA}


def _hugging_face(family: str, mesh: dict, microbatches: int = 1) -> dict:
    """Left-padded prompts, greedy and with eos, against the model's own ``generate``."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, fields = KNOWN[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=128, bos_token_id=0, **{"eos_token_id": 0, **fields})
    model = getattr(transformers, model_cls)(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 3), (2, 1)):  # prompts of 7, 4 and 6 tokens
        ids[row, :pads], mask[row, :pads] = 0, 0
    expect = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos = int(expect[0, 7 + 2])  # what the first sequence makes third
    expect_eos = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                eos_token_id=eos)
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), microbatches=microbatches)
    got = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    got_eos = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    programs = len(pm._programs)
    # a prompt four times as long: a program for it, and the same one-token program as before (it
    # reads the cache, never the prompt again)
    pm.generate(torch.randint(1, 128, (4, 28), generator=g), max_new_tokens=2)
    cache = [b for n, b in pm.named_buffers() if n.startswith("fxpar_cache") and "_keys_" in n]
    heads = sorted({b.shape[1] for b in cache})  # (batch, heads, length, dim), by rows (slots, heads, dim)
    return dict(got=got, expect=expect, got_eos=got_eos, expect_eos=expect_eos, programs=programs,
                longer=len(pm._programs), cache_heads=heads, cache_layers=len(cache))


HF_CASES = [("llama", dict(tp=2), 1), ("qwen3", dict(tp=2), 1), ("gemma", dict(tp=2), 1), ("gpt2", dict(tp=2), 1),
            ("gpt_neox", dict(tp=2), 1), ("mixtral", dict(tp=2), 1), ("phi", dict(tp=2), 1),
            ("llama", dict(pp=2, tp=2), 1), ("qwen3", dict(pp=2, tp=2), 1), ("gemma", dict(pp=2, tp=2), 1),
            ("gpt2", dict(pp=2, tp=2), 1), ("llama", dict(pp=2, tp=2), 2)]


@pytest.mark.parametrize("family, mesh, microbatches", HF_CASES,
                         ids=[f"{f}-{'x'.join(f'{k}{v}' for k, v in m.items())}-m{n}" for f, m, n in HF_CASES])
def test_hugging_face_models_generate_as_they_do_alone(pools, family, mesh, microbatches):
    """With microbatches, two groups of requests are in the pipeline at once, each reading and
    writing its own rows of the cache."""
    world = mesh.get("pp", 1) * mesh["tp"]
    for rank, r in enumerate(pools(world).run(_hugging_face, family, mesh, microbatches)):
        assert torch.equal(r["got"], r["expect"]), f"rank {rank}: {r['got'].tolist()} != {r['expect'].tolist()}"
        assert torch.equal(r["got_eos"], r["expect_eos"]), f"rank {rank} with eos: {r['got_eos'].tolist()}"
        assert r["programs"] == 2  # one prompt program, one token program, both reused for the eos run
        assert r["longer"] == 3
        _, _, fields = KNOWN[family]
        kv = fields.get("num_key_value_heads", fields.get("num_attention_heads", fields.get("n_head")))
        assert r["cache_heads"] == [max(1, kv // mesh["tp"])], f"rank {rank} holds {r['cache_heads']} heads of {kv}"
        layers = fields.get("num_hidden_layers", fields.get("n_layer"))
        assert r["cache_layers"] == layers // mesh.get("pp", 1)  # a pipeline rank holds its layers' caches only


def _forward_first(mesh: dict) -> dict:
    """Parallelized for the model's own forward (no positions: the cache never read) and run,
    then generation: the cache is placed when the first program that reads it is made."""
    model, prompt = _model(cached=False)
    expect = _recomputed(model, prompt)
    model.setup_caches(prompt.shape[0], MAX_LEN)
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), example_args=(prompt,))
    with torch.no_grad():
        pm(prompt)
    try:
        got = pm.generate(prompt, max_new_tokens=NEW)
    except FxparError as e:
        return dict(error=str(e))
    heads = sorted({b.shape[2] for n, b in pm.named_buffers() if n.endswith("cache_k")})
    return dict(got=got, expect=expect, heads=heads)


def test_a_cache_the_first_program_never_read_is_placed_by_the_one_that_does(pools):
    for r in pools(2).run(_forward_first, dict(tp=2)):
        assert torch.equal(r["got"], r["expect"])
        assert r["heads"] == [1]  # one key/value head of two: split, not kept whole
    for r in pools(4).run(_forward_first, dict(pp=2, tp=2)):  # pipeline rank 1 never held its layers' caches
        if "error" in r:
            assert "read first by these inputs" in r["error"] and "make the first call" in r["error"]
        else:
            assert torch.equal(r["got"], r["expect"])


def _stops_at_eos() -> tuple:
    model, prompt = _model()
    greedy = _recomputed(model, prompt)
    eos = int(greedy[0, PROMPT + 2])  # what the first sequence makes third
    model.setup_caches(prompt.shape[0], MAX_LEN)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2))
    return greedy, eos, pm.generate(prompt, max_new_tokens=NEW, eos_token_id=[eos])


def test_a_sequence_that_makes_eos_is_filled_with_it(pools):
    for greedy, eos, out in pools(2).run(_stops_at_eos):
        first = out[0, PROMPT:]
        stop = (first == eos).nonzero()[0].item()
        assert torch.equal(first[:stop + 1], greedy[0, PROMPT:PROMPT + stop + 1])
        assert (first[stop:] == eos).all()
        second = out[1, PROMPT:]
        made = (second == eos).nonzero()
        end = made[0].item() if len(made) else len(second)
        assert torch.equal(second[:end], greedy[1, PROMPT:PROMPT + end])
        if out.shape[1] < PROMPT + NEW:  # stopped early: both sequences made eos
            assert len(made)


def _token_flops() -> dict:
    """FLOPs this rank runs for 24 new tokens after a prompt of 7 and after one of 28 tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, fields = FAMILIES["llama"]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=128, **fields)).eval()
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2))
    g = torch.Generator().manual_seed(1)

    def flops(ids, new):
        with FlopCounterMode(display=False) as counter:
            pm.generate(ids, max_new_tokens=new, eos_token_id=[])
        return counter.get_total_flops()

    out = {}
    for length in (7, 28):
        ids = torch.randint(1, 128, (2, length), generator=g)
        pm.generate(ids, max_new_tokens=2)  # its programs made (capture runs ops too)
        out[length] = flops(ids, 25) - flops(ids, 1)
    ids = torch.randint(1, 128, (2, 7), generator=g)
    with FlopCounterMode(display=False) as counter:
        for _ in range(24):  # the whole prefix again every step, one process
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    out["again"] = counter.get_total_flops()
    return out


def test_new_tokens_cost_the_same_after_a_long_prompt(pools):
    """The cache is used: a token's work does not grow with the prompt (it would, re-running it)."""
    for r in pools(2).run(_token_flops):
        assert r[7] == r[28] > 0
        assert r["again"] > 2 * r[7]


def _disagreeing() -> str:
    model, prompt = _model()
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2))
    with pytest.raises(FxparError) as e:
        pm.generate(prompt, max_new_tokens=2 + torch.distributed.get_rank())
    return str(e.value)


def test_ranks_that_ask_for_different_generations_are_told_before_any_step(pools):
    for message in pools(2).run(_disagreeing):
        assert "pm.generate with different arguments" in message and "max_new_tokens" in message


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pick(logits, False), torch.tensor([1, 0]))
    for _ in range(20):  # top-k 1 and a tiny nucleus leave the most likely token only
        assert torch.equal(pick(logits, True, top_k=1, generator=g), torch.tensor([1, 0]))
        assert torch.equal(pick(logits, True, top_p=0.01, generator=g), torch.tensor([1, 0]))
    drawn = {int(pick(logits, True, top_k=2, generator=g)[0]) for _ in range(200)}
    assert drawn == {1, 3}  # never outside the two most likely


class Bigram(nn.Module):
    """A language model with no notion of positions or cache."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, idx):
        return self.head(self.embed(idx))


def _without_a_cache() -> list[str]:
    messages = []
    for model in (_model(cached=False)[0], Bigram()):  # a cache not set up; no positions at all
        pm = fxpar.parallelize(model.eval(), fxpar.Mesh(tp=2))
        with pytest.raises(FxparError) as e:
            pm.generate(torch.randint(0, 64, (2, PROMPT)), max_new_tokens=2)
        messages.append(str(e.value))
    return messages


def test_a_model_without_a_cache_is_told_how_to_get_one(pools):
    for not_set_up, no_positions in pools(2).run(_without_a_cache):
        assert "model.setup_caches(max_batch_size, max_seq_len)" in not_set_up and "causal_mask" in not_set_up
        assert "takes no positions" in no_positions and "forward(idx" in no_positions


class SplitThenOverwritten(nn.Module):
    """A buffer read split (added to a column-parallel output), then written in place along the
    dim it is split on, with values every rank holds whole."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.register_buffer("table", torch.zeros(8))

    def forward(self, x, idx, vals):
        h = self.fc(x) + self.table
        self.table.index_copy_(0, idx, vals)
        return self.out(h)


def test_an_in_place_write_is_never_made_on_a_copy():
    args = (torch.randn(2, 8), torch.tensor([1, 2]), torch.randn(2))
    with pytest.raises(PlanError, match="in place") as e:
        fxpar.compile(SplitThenOverwritten(), fxpar.Mesh(tp=2), args)
    assert "index_copy_" in str(e.value) and "table" in str(e.value)


def test_cli_generate(capsys):
    from fxpar.cli import main

    assert main(["generate", "gpt", "--tp", "2", "--prompt-len", "8", "--new", "4", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens match: yes" in out and "ms / token" in out and "KiB per new token" in out
