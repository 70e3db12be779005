"""Model code that is not in this repository: Hugging Face families with other layouts (fused
q/k/v cut by slicing, fused gate/up cut by chunk, parallel residual, per-head norms), planned
with no per-model rule and checked value by value and gradient by gradient at tp=2."""

import pytest
import torch

import fxpar
from tests.zoo import assert_close, loss_fn

transformers = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             max_position_embeddings=32, vocab_size=128, use_cache=False)


def family(name):
    T = transformers
    if name == "phi3":  # fused qkv_proj sliced into q, k, v; fused gate_up_proj chunked
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    if name == "gpt_neox":  # parallel attention + MLP residual, partial rotary
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, bos_token_id=0, eos_token_id=0))
    if name == "qwen3":  # q/k norms over each head
        return T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, bos_token_id=0, eos_token_id=0))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["phi3", "gpt_neox", "qwen3"])
def test_family_at_tp2(name):
    torch.manual_seed(0)
    model = family(name)
    idx = torch.randint(1, 128, (2, 8))
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,))
    styles = {v.split(":")[0] for k, v in plan.ctx.decisions.items() if ".layers." in k}
    assert styles == {"colwise", "rowwise"}, plan.ctx.decisions  # every layer's matmuls are split
    assert plan.check(idx) > 50
    loss, grads = plan.simulate_train(loss_fn, idx)
    ref = loss_fn(model(idx))
    ref.backward()
    assert_close(loss, ref, f"{name} loss")
    for pname, p in model.named_parameters():
        assert_close(grads[pname], p.grad, f"{name} gradient of {pname}")
