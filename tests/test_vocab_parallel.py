"""Vocabulary parallelism: the cross-entropy over logits split by vocabulary runs split, and its
loss and every gradient equal the single-device cross-entropy's; a rank never holds the full
logits."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxpar
from fxpar.metadata import COMM
from fxpar.models import gpt
from tests.zoo import HF, assert_close, build, loss_with_target


def _outside(model, args, kwargs, loss_of):
    """Loss and gradients (by parameter name, a tied one under its first name) of one step."""
    ref = copy.deepcopy(model)
    loss = loss_of(ref(*args, **kwargs))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _check(plan, model, args, kwargs, loss_of, tp, target=None):
    ce = [n for n in plan.graph_module.graph.nodes if n.target == torch.ops.aten.cross_entropy_loss.default]
    assert ce, "the loss is in the graph"
    for node in ce:
        # nothing is gathered for the loss: it reads the column-parallel projection's split output
        assert all(a.meta.get(COMM) is None for a in node.all_input_nodes), node.format_node()
    loss, grads = plan.simulate_train(None, *args, target=target, **kwargs)
    ref_loss, ref_grads = _outside(model, args, kwargs, loss_of)
    assert_close(loss, ref_loss, f"tp={tp} loss")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, f"tp={tp} gradient of {name}")


@pytest.mark.parametrize("tp", [2, 4])
def test_a_loss_function_over_the_logits(tp):
    """``loss_fn(logits, target)`` given to the compiler: captured with the model."""
    torch.manual_seed(0)
    model, (idx,) = gpt.build(vocab_size=96)
    target = torch.randint(0, 96, idx.shape)
    plan = fxpar.compile(model, fxpar.Mesh(tp=tp), (idx,), loss_fn=loss_with_target, example_target=target)
    assert plan.ctx.decisions["lm_head"] == "colwise"
    _check(plan, model, (idx,), {}, lambda out: loss_with_target(out, target), tp, target)


@pytest.mark.parametrize("tp", [2, 4])
def test_tied_embedding_and_projection_with_the_loss_inside_forward(tp):
    """nanoGPT computes ``F.cross_entropy`` inside ``forward`` and ties ``wte`` to ``lm_head``:
    both split by vocabulary, and the tied gradient (sum of both uses) is exact."""
    model, (idx,) = build("gpt")
    target = torch.roll(idx, -1, 1)
    plan = fxpar.compile(model, fxpar.Mesh(tp=tp), (idx, target), loss_fn=lambda out: out[1])
    d = plan.ctx.decisions
    assert d["lm_head"] == "colwise" and d["transformer.wte"] == "vocab"
    assert model.lm_head.weight is model.transformer.wte.weight
    _check(plan, model, (idx, target), {}, lambda out: out[1], tp)


def test_ignore_index_and_a_sum_reduction():
    """Tokens labelled -100 count for nothing; ``reduction="sum"`` is a sum."""
    model, (idx,) = build("gpt")
    target = idx.clone()
    target[:, :5] = -100

    def lf(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum") / 7

    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), loss_fn=lf, example_target=target)
    _check(plan, model, (idx,), {}, lambda out: lf(out, target), 2, target)


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_models_computing_the_loss_from_labels(name):
    """``model(input_ids, labels=labels).loss``: Hugging Face shifts the labels and calls
    ``cross_entropy`` inside ``forward``; that call runs split."""
    pytest.importorskip("transformers")
    model, (ids,) = build(name)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (ids,), {"labels": ids}, loss_fn=lambda out: out.loss)
    _check(plan, model, (ids,), {"labels": ids}, lambda out: out.loss, 2)


def test_label_smoothing_keeps_the_logits_whole_and_says_why():
    model, (idx,) = build("gpt")

    def lf(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten(), label_smoothing=0.1)

    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), loss_fn=lf, example_target=idx)
    assert "gathered before cross_entropy_loss" in plan.ctx.decisions["lm_head"]
    assert "label smoothing" in plan.ctx.decisions["lm_head"]
    loss, _ = plan.simulate_train(None, idx, target=idx)
    assert_close(loss, lf(model(idx), idx), "loss with label smoothing")


class _Largest(TorchDispatchMode):
    """The largest tensor any operator produces (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


VOCAB = 4096


def _largest_tensor_in_a_step(tp: int) -> int:
    """Train one step of a GPT whose logits dwarf every other tensor; report the largest tensor
    this rank's forward, loss and backward produced."""
    torch.manual_seed(0)
    model, (idx,) = gpt.build(vocab_size=VOCAB, n_embd=32, n_head=2)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=tp), example_args=(idx,), loss_fn=loss_with_target,
                           example_target=idx)
    pm.train_step(idx, target=idx)  # built and warmed; the second step is measured
    with _Largest() as mode:
        pm.train_step(idx, target=idx)
    dist.barrier()
    return mode.largest


def test_per_rank_peak_logits_memory_drops_by_tp(pools, capsys):
    """Measured over real processes: the largest tensor a rank allocates in a training step is
    its vocabulary slice of the logits, ``1/tp`` of the full logits."""
    full = 2 * 16 * VOCAB
    rows = []
    for tp in (1, 2, 4):
        largest = pools(tp).run(_largest_tensor_in_a_step, tp)
        assert max(largest) == full // tp, (tp, largest)
        rows.append((tp, max(largest) * 4 / 2**10))
    with capsys.disabled():
        print("\n  tp  largest tensor per rank (KiB)  ratio to tp=1")
        for tp, kib in rows:
            print(f"  {tp:2d}  {kib:30.0f}  {kib / rows[0][1]:.2f}")
