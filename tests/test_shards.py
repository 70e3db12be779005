"""Each rank holds only its shards: parameter bytes per rank, and models built on the meta device
whose shards are made from a seed without ever making the full tensors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxpar
from fxpar import holder
from fxpar.placement import Shard
from fxpar.report import param_bytes
from fxpar.shards import init_state_dict, shard_tensor
from fxpar.models import gpt, llama


def test_gpt2_small_at_tp4_holds_a_quarter_plus_the_replicated_pieces():
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig())  # GPT-2 small: 124M parameters, 12 layers, 768 wide
    plan = fxpar.compile(model, fxpar.Mesh(tp=4), (torch.randint(0, 50304, (1, 64)),))
    total, local = param_bytes(plan.graph_module, plan.ctx)
    # the pieces that stay whole on every rank: norms and biases (vectors)
    vectors = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 1)
    expected = total / 4 + vectors * 3 / 4
    assert total == sum(p.numel() * 4 for p in model.parameters())
    assert abs(local - expected) / expected < 0.05, (local, expected)


def test_bytes_actually_held_match_the_plan():
    model, args = gpt.build()
    plan = fxpar.compile(model, fxpar.Mesh(tp=4), args)
    _, local = param_bytes(plan.graph_module, plan.ctx)
    for r in range(4):
        held = sum(p.numel() * p.element_size() for p in plan.rank_module(r).parameters())
        assert held == local


class AllocationShapes(TorchDispatchMode):
    """Records, per parameter being made, the shape of every tensor with storage an op creates."""

    def __init__(self):
        super().__init__()
        self.current = None
        self.shapes: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.shapes.setdefault(self.current, set()).add(tuple(t.shape))
        return out

    def watch(self, init):
        def wrapped(name, *args, **kwargs):
            self.current = name
            return init(name, *args, **kwargs)

        return wrapped


@pytest.mark.parametrize("tp", [2, 4])
def test_meta_model_shards_are_seeded_slices_and_never_full(tp, monkeypatch):
    torch.manual_seed(0)
    with torch.device("meta"):
        model, _ = gpt.build(n_embd=128, vocab_size=1024, n_layer=2, block_size=256)  # tables of 4 blocks or more
    idx = torch.randint(0, 1024, (2, 16))
    plan = fxpar.compile(model, fxpar.Mesh(tp=tp), (idx,), seed=1234)
    full = init_state_dict(plan.captured.gm, seed=1234)
    sharded = {n: p for n, p in plan.ctx.param_placements.items() if isinstance(p, Shard)}
    assert len(sharded) > 10
    for r in range(tp):
        seen = AllocationShapes()
        monkeypatch.setattr(holder, "init_tensor", seen.watch(holder.init_tensor))
        with seen:
            mod = plan.rank_module(r)
        monkeypatch.undo()
        for name in sharded:
            made = seen.shapes.get(name, set())
            assert made and tuple(full[name].shape) not in made, f"rank {r} made a full-size {name}: {made}"
        for name, tensor in full.items():
            local = dict(mod.named_parameters())[name]
            torch.testing.assert_close(local, shard_tensor(tensor, plan.ctx.param_placements[name], r), rtol=0, atol=0)


def test_meta_model_trains_like_the_same_model_initialized_in_full():
    torch.manual_seed(0)
    with torch.device("meta"):
        meta_model, _ = llama.build()
    ref, (tokens,) = llama.build()
    plan = fxpar.compile(meta_model, fxpar.Mesh(tp=2), (tokens,), seed=7, init_fn=_llama_init(seed=7))
    state = init_state_dict(plan.captured.gm, seed=7)
    state["freqs_cis"] = ref.freqs_cis
    ref.load_state_dict(state, strict=False)
    torch.testing.assert_close(plan.simulate(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


def _llama_init(seed):
    """The rotary table, a buffer, computed as the model computes it; None: fxpar's seeded init."""
    args = llama.ModelArgs(dim=64, n_heads=4, max_seq_len=64)

    def init(name, shape, dtype, placement, rank):
        if name == "freqs_cis":
            return llama.precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len * 2)
        return None

    return init
