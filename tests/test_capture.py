"""Capture: unmodified models, on the meta device, with symbolic batch and sequence sizes."""

import pytest
import torch

import fxpar
from fxpar.capture import capture, meta_skeleton
from fxpar.models import gpt, llama, mlp
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


class Built(torch.nn.Module):
    """Builds tensors in forward: a mask value on the input's device, a list index, a buffer
    filled piece by piece."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 24), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x).view(*x.shape[:-1], 3, 8)  # 3 groups of 8
        first, last = h[..., 0, :], h[..., [-1], :].squeeze(-2)
        buf = first.new_empty(*first.shape[:-1], 16)
        buf[..., :8].copy_(first)
        buf[..., 8:].copy_(last)
        masked = torch.where(buf > 0, buf, torch.tensor(-1e4, device=x.device))
        return self.down(masked)


def test_tensors_built_in_forward_keep_their_values():
    torch.manual_seed(0)
    model, x = Built(), torch.randn(2, 4, 8)
    cap = capture(model, (x,))
    targets = {n.target for n in cap.gm.graph.nodes}
    # the list index is a slice, the filled buffer a cat; no constant is left without values
    assert aten.index.Tensor not in targets and aten.copy_.default not in targets and aten.cat.default in targets
    for n in cap.gm.graph.nodes:
        if n.op == "get_attr" and "lifted" in n.target:
            mod, _, attr = n.target.rpartition(".")
            assert getattr(cap.gm.get_submodule(mod), attr).device.type == "cpu"
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (x,))
    assert_close(plan.simulate(x), model(x), "output with tensors built in forward")


def test_a_constant_without_values_is_refused_where_it_is_built():
    class Table(torch.nn.Module):
        def forward(self, x):
            return x * torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device)  # on meta while captured

    with pytest.raises(fxpar.CaptureError, match="no values") as e:
        capture(Table(), (torch.randn(2, 4),))
    assert "test_capture.py" in str(e.value) and "device='cpu'" in str(e.value)
