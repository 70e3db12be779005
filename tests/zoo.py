"""Models the tests run, each built from a config with random weights, and the checks they share."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fxpar.models import gpt, llama, mlp, moe

REFERENCE = {
    "gpt": lambda: gpt.build(),
    "gpt_matmul": lambda: gpt.build(flash=False),
    "llama": lambda: llama.build(),
    "mlp": lambda: mlp.build(),
    "moe": lambda: moe.build(),
}


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg), (torch.randint(0, 128, (2, 8)),)


def hf_llama(kv_heads=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=32, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg), (torch.randint(0, 128, (2, 8)),)


HF = {"hf_gpt2": hf_gpt2, "hf_llama": hf_llama}

_DECODER = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                max_position_embeddings=32)
# Hugging Face families: (config class, model class, config fields), small, without dropout
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, n_positions=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, num_key_value_heads=1, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=4, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                                max_position_embeddings=32, word_embed_proj_dim=64)),
    "bert": ("BertConfig", "BertForMaskedLM", _DECODER),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DECODER, num_key_value_heads=2, num_local_experts=4,
                                                          num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=16, num_experts=4,
                                                               num_experts_per_tok=2, moe_intermediate_size=64)),
}
# more mixture-of-experts families, for expert parallelism (grouped experts; Qwen2-MoE adds a
# shared expert every token goes through, GraniteMoE its own stacked-expert module)
MOE_FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_DECODER, num_key_value_heads=2, num_experts=4,
                                                      num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_DECODER, num_key_value_heads=2, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=64,
                                                                shared_expert_intermediate_size=64)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(_DECODER, num_key_value_heads=2, num_local_experts=4,
                                                                     num_experts_per_tok=2)),
}
# families whose layouts defeat a name-free planner in other ways (parameter shares asserted in
# tests/test_generality.py): fused projections with segments of different layouts, views that
# regroup a fused dim, low-rank bottlenecks, ops with rules of their own, constants built in forward
GENERALITY = {
    # fused q/k/v with fewer key/value heads than tp ranks (2 kv heads, tp=4) or one for all
    "phi3_gqa": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=2, pad_token_id=0)),
    "phi3_mqa": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=1, pad_token_id=0)),
    # fused q/k/v of multi-query attention viewed as heads + 2, key and value taken by list index;
    # a mask value built in forward with torch.tensor(..., device=x.device)
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(num_layers=2, attention_types=[[["global", "local"], 1]],
                                                         hidden_size=64, num_heads=4, max_position_embeddings=32)),
    # multi-query attention: one key/value head next to the query heads in one projection
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_layer=2, n_embd=64, n_head=4, n_positions=32,
                                                                     multi_query=True)),
    # per-head interleaved q/k/v, ALiBi scores through baddbmm
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=64, n_head=4)),
    # fused Wqkv viewed as (3, heads, head_dim)
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(num_hidden_layers=2, hidden_size=64,
                                                                    intermediate_size=128, num_attention_heads=4,
                                                                    pad_token_id=0, cls_token_id=0, sep_token_id=0)),
    # a state-space mixer: depthwise conv1d, a weight-on-the-left matmul, the scan in Python
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(num_hidden_layers=2, hidden_size=64, state_size=8)),
    # multi-head latent attention with q-LoRA, then a mixture-of-experts layer
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DECODER, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=1, topk_group=1)),
}
_DROPOUTS = ("attention_dropout", "hidden_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob",
             "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout", "classifier_dropout",
             "embed_dropout", "resid_dropout", "embedding_dropout", "mlp_dropout")


def hf_family(name: str, seed: int = 0):
    """A small ``name`` model with random weights, ``input_ids`` and ``labels`` for them."""
    import transformers

    config_cls, model_cls, fields = {**FAMILIES, **MOE_FAMILIES, **GENERALITY}[name]
    cfg = getattr(transformers, config_cls)(vocab_size=128, use_cache=False, bos_token_id=0, eos_token_id=0, **fields)
    for k in _DROPOUTS:
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, 128, (4, 8), generator=g)
    return model, ids, torch.randint(0, 128, (4, 8), generator=g)


class TorchEncoderLM(torch.nn.Module):
    """A language model on ``nn.TransformerEncoder``: the fused ``in_proj_weight`` of
    ``nn.MultiheadAttention``, cut by ``unflatten`` into q, k and v."""

    def __init__(self, vocab=128, width=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        block = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(self.encoder(self.embed(idx)))


def torch_encoder():
    return TorchEncoderLM(), (torch.randint(0, 128, (2, 8)),)


REFERENCE["torch_encoder"] = torch_encoder


def hf_loss(out):
    """The loss a Hugging Face model computes inside ``forward`` when given ``labels``."""
    return out.loss


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return {**REFERENCE, **HF}[name]()


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def loss_fn(out):
    """Cross-entropy against fixed targets for language models, MSE against a fixed target else."""
    t = logits(out).float()
    g = torch.Generator().manual_seed(7)
    if t.dim() == 3:
        targets = torch.randint(0, t.shape[-1], t.shape[:-1], generator=g)
        return F.cross_entropy(t.flatten(0, 1), targets.flatten())
    return F.mse_loss(t, torch.randn(t.shape, generator=g))


RTOL = ATOL = 1e-5


def assert_close(got, expect, what: str, rtol=RTOL, atol=ATOL):
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    if not torch.allclose(got, expect, rtol=rtol, atol=atol):
        diff = (got - expect).abs().max().item()
        raise AssertionError(f"{what}: max |difference| {diff:.3g} exceeds rtol={rtol}, atol={atol}")


def simulated_step_alike(plan, model, loss, *args, what: str = "") -> None:
    """``plan.simulate_train(loss, *args)`` gives the loss and every gradient of ``model``."""
    got, grads = plan.simulate_train(loss, *args)
    ref = loss(model(*args))
    ref.backward()
    assert_close(got, ref, f"{what} loss")
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, f"{what} gradient of {name}")


def adamw(params, lr=1e-3):
    """AdamW with eps=1e-6. Some gradients are exactly zero in exact arithmetic (the key bias of
    attention: softmax ignores a shift), so in fp32 they are rounding noise that depends on the
    order of summation; with the default eps=1e-8 Adam divides that noise by itself and moves the
    weight by up to lr, on the single-device model as on any tensor-parallel one. eps=1e-6 keeps
    the comparison about the gradients rather than about that division."""
    return torch.optim.AdamW(params, lr=lr, eps=1e-6)


def train_alike(ref, ref_loss, parallel_step, optimizers, full_state, what: str, steps: int = 3, lr: float = 1e-3):
    """``steps`` AdamW steps of the single-device ``ref`` (``ref_loss(ref)`` its loss) and of a
    parallel model (``parallel_step()`` -> its loss and every gradient by name, ``optimizers``
    stepping its ranks): the losses and all gradients at every step, then the weights
    (``full_state()``), must be equal."""
    ropt = adamw(ref.parameters(), lr=lr)
    for step in range(steps):
        expect = ref_loss(ref)
        expect.backward()
        loss, grads = parallel_step()
        assert_close(loss, expect.detach(), f"{what} loss at step {step}")
        for name, p in ref.named_parameters():
            assert_close(grads[name], p.grad, f"{what} step {step} gradient of {name}")
        for o in [*optimizers, ropt]:
            o.step()
            o.zero_grad()
    final = full_state()
    for key, value in ref.state_dict().items():
        assert_close(final[key], value, f"{what} {key} after {steps} steps")


def reference_steps(model, args, steps: int, lr: float):
    """Losses, per-step gradients and final state of the single-device model under AdamW."""
    ref = copy.deepcopy(model)
    opt = adamw(ref.parameters(), lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        loss = loss_fn(ref(*args))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads, ref.state_dict()


def loss_with_target(out, target):
    """Cross-entropy for language models, MSE else, against a given target."""
    t = logits(out).float()
    if t.dim() == 3:
        return F.cross_entropy(t.flatten(0, 1), target.flatten())
    return F.mse_loss(t, target)


def pipeline_case(name: str, copies: int):
    """A model, a batch of ``copies`` x its example batch, and a fixed target for it."""
    model, args = build(name)
    args = tuple(torch.cat([a] * copies, 0) for a in args)
    with torch.no_grad():
        out = logits(model(*args))
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g) if out.dim() == 3 else torch.randn(out.shape, generator=g)
    return model, args, target


def error_of(fn) -> str:
    """``"ErrorType: message"`` of the fxpar error ``fn()`` raises, or ``"no error"``: what a
    test sends back from every rank to check that each raised, and what."""
    import fxpar

    try:
        fn()
    except fxpar.FxparError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"
