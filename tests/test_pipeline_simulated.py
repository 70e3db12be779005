"""Pipeline plans in one process: every rank of dp x pp x tp on threads, every microbatch under the
schedule. Loss, every gradient and the weights after 3 AdamW steps equal the single-device model
trained on the whole batch; inference returns its output."""

import copy

import pytest
import torch

import fxpar
from tests.zoo import adamw, assert_close, logits, loss_with_target, pipeline_case

STEPS, LR = 3, 1e-3

CASES = [
    # model, dp, pp, tp, schedule, microbatches
    ("gpt", 1, 2, 1, "1f1b", 4),
    ("gpt", 1, 4, 1, "gpipe", 4),
    ("gpt", 1, 2, 1, "interleaved", 4),
    ("gpt", 1, 2, 2, "1f1b", 4),
    ("gpt", 2, 2, 1, "1f1b", 2),
    ("llama", 1, 4, 1, "interleaved", 4),
    ("llama", 1, 2, 2, "gpipe", 2),
    ("llama", 2, 2, 1, "interleaved", 2),
    ("mlp", 1, 2, 1, "gpipe", 2),
    ("mlp", 2, 2, 2, "1f1b", 2),
    ("hf_gpt2", 1, 2, 2, "1f1b", 2),
    ("hf_llama", 2, 2, 1, "gpipe", 2),
]


@pytest.mark.parametrize("name, dp, pp, tp, schedule, m", CASES, ids=lambda x: str(x))
def test_pipeline_training(name, dp, pp, tp, schedule, m):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    model, args, target = pipeline_case(name, dp * m)
    ref = copy.deepcopy(model)
    ropt = adamw(ref.parameters(), lr=LR)
    plan = fxpar.compile(model, fxpar.Mesh(dp=dp, pp=pp, tp=tp), args, schedule=schedule, microbatches=m)
    assert len(plan.ctx.pipeline.stages) == pp * (2 if schedule == "interleaved" else 1)
    opts = [adamw(ps, lr=LR) for ps in plan.optimizer_params()]
    for step in range(STEPS):
        ref_loss = loss_with_target(ref(*args), target)
        ref_loss.backward()
        loss, grads = plan.simulate_train(loss_with_target, *args, target=target)
        assert_close(loss, ref_loss.detach(), f"loss at step {step}")
        for pname, p in ref.named_parameters():
            assert_close(grads[pname], p.grad, f"step {step} gradient of {pname}")
        for o in opts:
            o.step()
            o.zero_grad()
        ropt.step()
        ropt.zero_grad()
    final = plan.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(final[key], value, f"{key} after {STEPS} steps")
    with torch.no_grad():
        assert_close(logits(plan.simulate(*args)), logits(ref(*args)), "inference output")


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
