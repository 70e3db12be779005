"""Capture: unmodified models, on the meta device, with symbolic batch and sequence sizes."""

import pytest
import torch

import fxpar
from fxpar.capture import capture, meta_skeleton
from models import gpt, llama, mlp
from tests.zoo import assert_close, build

aten = torch.ops.aten


@pytest.mark.parametrize("name", ["gpt", "llama", "mlp", "hf_gpt2", "hf_llama"])
def test_capture_keeps_original_parameter_names(name):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    model, args = build(name)
    cap = capture(model, args)
    used = {n.target for n in cap.gm.graph.nodes if n.op == "get_attr"}
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert {t for t in used if t in cap.aliases} <= names | {n for n, _ in model.named_buffers()}
    assert all(n.meta.get("val") is not None for n in cap.gm.graph.nodes if n.op == "call_function" and n.users)
    assert not any(p.device.type != "meta" for p in cap.gm.parameters())  # no weight memory


def test_tied_weights_keep_every_name():
    model, args = build("gpt")
    cap = capture(model, args)
    assert sorted(cap.aliases["lm_head.weight"]) == ["lm_head.weight", "transformer.wte.weight"]


def test_meta_skeleton_allocates_nothing_and_stays_tied():
    model, _ = build("gpt")
    sk = meta_skeleton(model)
    assert all(p.device.type == "meta" for p in sk.parameters())
    assert sk.lm_head.weight is sk.transformer.wte.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_capture_on_the_meta_device():
    with torch.device("meta"):
        model, _ = llama.build()
    cap = capture(model, (torch.randint(0, 256, (2, 16)),))
    assert any(n.target == aten.scaled_dot_product_attention.default for n in cap.gm.graph.nodes)


@pytest.mark.parametrize("builder, name", [(gpt.build, "idx"), (llama.build, "tokens")])
def test_symbolic_batch_and_sequence(builder, name):
    torch.manual_seed(0)
    model, args = builder()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args, dynamic_shapes={name: {0: "batch", 1: "seq"}})
    assert sorted(plan.captured.dim_names.values()) == ["batch", "seq"]
    for b, t in ((2, 16), (3, 5), (1, 32)):
        x = torch.randint(0, 256, (b, t))
        assert_close(plan.simulate(x), model(x), f"batch {b} seq {t}")


def test_mlp_capture_and_plan_with_kwargs():
    model, (x,) = mlp.build()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), example_kwargs={"x": x})
    assert_close(plan.simulate(x=x), model(x), "output called with a keyword")


def test_integer_histograms_run_on_the_cpu():
    """Captured on meta, code that branches on the device takes its CUDA branch (histc of ints)."""

    class Counts(torch.nn.Module):
        def forward(self, idx):
            data = idx.int() if idx.device.type != "cpu" else idx.float()
            return torch.histc(data, bins=4, min=0, max=3).cumsum(0)

    idx = torch.tensor([0, 1, 1, 3, 3, 3])
    plan = fxpar.compile(Counts(), fxpar.Mesh(tp=1), (idx,))
    assert torch.equal(plan.simulate(idx), Counts()(idx))
