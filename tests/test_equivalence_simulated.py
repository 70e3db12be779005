"""The core test, in one process: every rank simulated on threads. Outputs, every parameter
gradient and the weights after 3 AdamW steps equal the single-device model's."""

import pytest

import fxpar
from tests.zoo import adamw, assert_close, build, loss_fn, reference_steps

STEPS, LR = 3, 1e-3


def check_training(name: str, tp: int = 1, mesh=None, **options):
    """Simulate training ``name`` on ``mesh`` (default ``Mesh(tp=tp)``): output, loss and every
    gradient at each of three AdamW steps, then the weights, equal the single-device model's."""
    mesh = mesh or fxpar.Mesh(tp=tp)
    model, args = build(name)
    out_ref = model(*args)
    losses, grads, state = reference_steps(model, args, STEPS, LR)
    plan = fxpar.compile(model, mesh, args, **options)
    out = plan.simulate(*args)
    assert type(out) is type(out_ref)
    assert_close(getattr(out, "logits", out), getattr(out_ref, "logits", out_ref), f"{name} {mesh} output")
    opts = [adamw(plan.rank_module(r).parameters(), lr=LR) for r in range(mesh.size)]
    for step in range(STEPS):
        loss, full = plan.simulate_train(loss_fn, *args)
        assert_close(loss, losses[step], f"{name} {mesh} loss at step {step}")
        assert set(full) == set(grads[step]), "gradients missing for some parameters"
        for pname, g in grads[step].items():
            assert_close(full[pname], g, f"{name} {mesh} step {step} gradient of {pname}")
        for o in opts:
            o.step()
            o.zero_grad()
    final = plan.full_state_dict()
    assert set(final) == set(state)
    for key, value in state.items():
        assert_close(final[key], value, f"{name} {mesh} {key} after {STEPS} AdamW steps")
    return plan


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt", "llama", "mlp"])
def test_reference_models(name, tp):
    check_training(name, tp)


def test_gpt_matmul_attention():
    check_training("gpt_matmul", 2)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_hugging_face(name):
    pytest.importorskip("transformers")
    plan = check_training(name, 2)
    if name == "hf_llama":  # one key/value head for two ranks: both hold it, its gradient summed over them
        kv = plan.ctx.param_placements["model.layers.0.self_attn.k_proj.weight"]
        assert kv.is_whole and plan.ctx.decisions["model.layers.0.self_attn.k_proj"] == "colwise"
        assert plan.ctx.decisions["model.layers.0.self_attn.q_proj"] == "colwise"
