"""Repeated blocks planned once: ``blocks.copies`` pairs every layer with an earlier one it repeats
op for op, and ``estimate_memory`` takes a copy's results from it. The estimate must be exactly
what running every layer gives."""

import dataclasses
import importlib

import pytest
import sympy
import torch
import torch.nn as nn

import fxpar
from fxpar.blocks import copies, stack
from fxpar.capture import capture
from fxpar.codegen import rank_graph
from fxpar.metadata import MEMORY
from fxpar.models import gpt, llama, moe
from fxpar.planning import plan_graph
from tests.zoo import TorchEncoderLM

estimate_memory = importlib.import_module("fxpar.passes.estimate_memory")


def hf(config_cls, model_cls, **fields):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, config_cls)(vocab_size=128, use_cache=False, bos_token_id=0, eos_token_id=0,
                                            num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=32, **fields)
    return getattr(transformers, model_cls)(cfg), (torch.randint(1, 128, (4, 8)),)


MODELS = {
    "llama": lambda: llama.build(n_layers=4),
    "gpt": lambda: gpt.build(n_layer=4),
    "moe": lambda: moe.build(n_layers=4),
    "torch_encoder": lambda: (TorchEncoderLM(layers=4), (torch.randint(0, 128, (2, 8)),)),
    "hf_llama": lambda: hf("LlamaConfig", "LlamaForCausalLM"),
    "hf_qwen3": lambda: hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    "hf_mixtral": lambda: hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
}

CASES = [
    ("llama", dict(tp=2), {}),
    ("llama", dict(tp=2), dict(sequence_parallel=True)),
    ("llama", dict(pp=2, tp=2), dict(microbatches=2)),
    ("llama", dict(dp=2), dict(zero=3)),
    ("llama", dict(tp=2), dict(recompute="full")),
    ("gpt", dict(tp=2), {}),
    ("moe", dict(ep=2), {}),  # tokens per expert are known at run time only: every layer is run
    ("torch_encoder", dict(tp=2), {}),
    ("hf_llama", dict(tp=2), {}),
    ("hf_qwen3", dict(tp=2), dict(sequence_parallel=True)),
    ("hf_mixtral", dict(tp=2), {}),
]


def memory_of(gm) -> dict:
    """Every node's estimate, its sizes expanded (``s*(t - 1) + s`` and ``s*t`` are one size)."""
    expand = lambda e: sympy.expand(e) if isinstance(e, sympy.Basic) else e  # noqa: E731
    return {n.name: dataclasses.replace(m, **{f.name: expand(getattr(m, f.name)) for f in dataclasses.fields(m)})
            if m is not None else None for n in gm.graph.nodes for m in [n.meta.get(MEMORY)]}


@pytest.mark.parametrize("name,mesh,options", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_estimate_from_copies_is_the_estimate_of_every_layer(name, mesh, options, monkeypatch):
    torch.manual_seed(0)
    model, args = MODELS[name]()
    cap = capture(model, args)
    taken = []
    take = estimate_memory._Repeats.take

    def counting(self, node):
        out = take(self, node)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(estimate_memory._Repeats, "take", counting)
    gm, _ = plan_graph(cap, fxpar.Mesh(**mesh), **options)
    with_copies = memory_of(gm)
    if "ep" in mesh:
        assert not any(taken)  # sizes a run gives each layer anew (u0, u1, ...) are never copied
        return
    assert any(taken), "no layer's estimate was taken from another's: the test would prove nothing"
    monkeypatch.setattr(estimate_memory, "copies", lambda graph: [])
    gm, _ = plan_graph(cap, fxpar.Mesh(**mesh), **options)
    every_layer = memory_of(gm)
    assert with_copies == every_layer


def test_symbolic_sizes_are_copied_as_expressions():
    model, (tokens,) = llama.build(n_layers=4)
    batch, seq = torch.export.Dim("batch", min=2), torch.export.Dim("seq", min=2, max=64)
    cap = capture(model, (tokens,), dynamic_shapes=({0: batch, 1: seq},))
    gm, _ = plan_graph(cap, fxpar.Mesh(tp=2))
    with_copies = memory_of(gm)
    saved = [m.saved_new for m in with_copies.values() if m is not None and not isinstance(m.saved_new, int)]
    assert saved and all(getattr(e, "free_symbols", None) for e in saved)
    original = estimate_memory.copies
    estimate_memory.copies = lambda graph: []
    try:
        gm, _ = plan_graph(cap, fxpar.Mesh(tp=2))
    finally:
        estimate_memory.copies = original
    assert with_copies == memory_of(gm)


def test_each_layer_is_paired_with_an_earlier_one_and_its_own_weights():
    model, args = llama.build(n_layers=6)
    gm, _ = plan_graph(capture(model, args), fxpar.Mesh(tp=2))
    found = copies(rank_graph(gm, 0, torch.device("cpu")))
    assert len(found) >= 4  # the first layer (fed by the embedding) may differ from the rest
    for c in found:
        assert len(c.template) == len(c.nodes) and c.template[0] is not c.nodes[0]
        weights = {a.target: b.target for a, b in c.inputs.items() if a.op == "get_attr"}
        assert weights
        for a, b in weights.items():
            # layers.1.attention.wq.weight -> layers.4.attention.wq.weight
            assert a.split(".")[2:] == b.split(".")[2:] and a.split(".")[1] != b.split(".")[1]


class Unequal(nn.Module):
    """A stack whose third layer is wider than the others: it repeats none of them."""

    def __init__(self):
        super().__init__()
        widths = [32, 32, 32, 48, 32]
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, w), nn.ReLU(), nn.Linear(w, 32)) for w in widths)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_a_layer_that_differs_is_no_copy():
    gm, _ = plan_graph(capture(Unequal(), (torch.randn(4, 32),)), fxpar.Mesh(tp=2))
    found = copies(rank_graph(gm, 0, torch.device("cpu")))
    modules = {path for c in found for n in c.nodes for path, _ in stack(n)}
    assert not any(m.startswith("layers.3") for m in modules)
    assert any(m.startswith("layers.4") or m.startswith("layers.2") for m in modules)
