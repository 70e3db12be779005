"""Pipeline plans in one process: every rank of dp x pp x tp on threads, every microbatch under the
schedule. Loss, every gradient and the weights after 3 AdamW steps equal the single-device model
trained on the whole batch; inference returns its output."""

import copy

import pytest
import torch

import fxpar
from tests.zoo import adamw, assert_close, logits, loss_with_target, pipeline_case, train_alike

STEPS, LR = 3, 1e-3

MODELS = ["gpt", "llama", "mlp", "hf_gpt2", "hf_llama"]
MESHES = [(1, 2, 1), (1, 4, 1), (1, 2, 2), (2, 2, 1)]  # dp, pp, tp
SCHEDULES = ["gpipe", "1f1b", "interleaved"]
CASES = [(name, dp, pp, tp, schedule, 4 if pp == 4 else 2)
         for name in MODELS for dp, pp, tp in MESHES for schedule in SCHEDULES]
# the zero-bubble schedules (B and W apart) on the reference models and a Hugging Face one
CASES += [(name, dp, pp, tp, schedule, 4 if pp == 4 else 2)
          for name in ("gpt", "llama", "hf_llama") for dp, pp, tp in MESHES[:3] for schedule in ("zbh1", "zbv")]
CASES += [("llama", 1, 4, 2, "zbv", 4), ("gpt", 1, 4, 2, "zbh1", 4)]


@pytest.mark.parametrize("name, dp, pp, tp, schedule, m", CASES, ids=lambda x: str(x))
def test_pipeline_training(name, dp, pp, tp, schedule, m):
    check_pipeline(name, dp, pp, tp, schedule, m)


def check_pipeline(name, dp, pp, tp, schedule, m, cp=1, ep=1, case=None, **options):
    """Train ``name`` through the schedule and compare with the single-device model; the plan.
    ``case``: ``(model, args, target)`` instead of ``pipeline_case``'s copies of one batch."""
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    model, args, target = case or pipeline_case(name, dp * m)
    ref = copy.deepcopy(model)
    mesh = fxpar.Mesh(dp=dp, pp=pp, ep=ep, cp=cp, tp=tp)
    plan = fxpar.compile(model, mesh, args, schedule=schedule, microbatches=m, **options)
    assert len(plan.ctx.pipeline.stages) == pp * (2 if schedule in ("interleaved", "zbv") else 1)
    opts = [adamw(ps, lr=LR) for ps in plan.optimizer_params() if ps]  # a rank may hold no weights
    train_alike(ref, lambda r: loss_with_target(r(*args), target),
                lambda: plan.simulate_train(loss_with_target, *args, target=target),
                opts, plan.full_state_dict, str(mesh), STEPS, LR)
    with torch.no_grad():
        assert_close(logits(plan.simulate(*args)), logits(ref(*args)), "inference output")
    return plan


def test_tied_embedding_gradients_are_combined_across_stages():
    model, args, target = pipeline_case("gpt", 4)
    plan = fxpar.compile(model, fxpar.Mesh(pp=4), args, schedule="1f1b", microbatches=4)
    spec = plan.ctx.pipeline
    assert spec.tied == {"lm_head.weight": [0, 3]}  # the embedding on the first stage, the output on the last
    _, grads = plan.simulate_train(loss_with_target, *args, target=target)
    loss_with_target(model(*args), target).backward()
    assert_close(grads["transformer.wte.weight"], model.transformer.wte.weight.grad, "tied gradient")
    first, last = plan.program(0).params["lm_head.weight"], plan.program(3).params["lm_head.weight"]
    assert torch.equal(first.grad, last.grad)  # both copies step the same way


def test_symbolic_sizes_cross_stages():
    model, args, _ = pipeline_case("gpt", 2)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), args, microbatches=2, dynamic_shapes={"idx": {0: "batch", 1: "seq"}})
    for b, t in ((4, 16), (6, 9)):
        idx = torch.randint(0, 256, (b, t))
        assert_close(plan.simulate(idx), model(idx), f"batch {b} seq {t}")
        loss, grads = plan.simulate_train(lambda out: out.float().pow(2).mean(), idx)
        model.zero_grad()
        model(idx).float().pow(2).mean().backward()
        assert_close(grads["transformer.wte.weight"], model.lm_head.weight.grad, f"gradient at batch {b} seq {t}")
        for prog in plan._programs.values():
            for p in prog.params.values():
                p.grad = None


class Stacked(torch.nn.Module):
    """An output whose batch is not on dim 0, and two dropouts in two stages."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        a = self.drop(self.l1(x))
        b = self.drop(self.l2(a))
        return torch.stack([a, b])


def test_outputs_joined_along_the_batch_and_stages_draw_their_own_masks():
    torch.manual_seed(0)
    model, x = Stacked(), torch.ones(8, 16)
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), (x,), microbatches=2, split_points=["l2"])
    out = plan.simulate(x)
    assert out.shape == model(x).shape == (2, 8, 16)
    model.eval()
    plan_eval = fxpar.compile(model, fxpar.Mesh(pp=2), (x,), microbatches=2, split_points=["l2"])
    with torch.no_grad():
        assert_close(plan_eval.simulate(x), model(x), "eval output")
    # the second stage does not repeat the first one's mask on the same shape
    assert not torch.equal(out[0] == 0, out[1] == 0)


@pytest.mark.parametrize("options, message", [
    (dict(schedule="interleaved", virtual=1), "virtual=1 must be 2 or more"),
    (dict(schedule="1f1b", virtual=3), "needs schedule='interleaved'"),
])
def test_schedule_options_are_checked(options, message):
    model, args, _ = pipeline_case("mlp", 2)
    with pytest.raises(ValueError, match=message):
        fxpar.compile(model, fxpar.Mesh(pp=2), args, **options)
