"""Hugging Face transformers experts through ``flashfusemoe.integrations.hf``: tiny random-weight models
of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and DeepSeek-V3 give HF's ``eager`` experts' logits and every
parameter gradient (fp32; both backends, triton under the CPU interpreter); unsupported experts
(GPT-OSS, tanh GELU) are refused with a clear error; HF's expert-parallel sentinels are masked."""

import copy
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

from flashfusemoe.integrations import hf  # noqa: E402

DEV = torch.device("cpu")  # the fp32 equivalence tests; the bf16 GPU test below moves its models
ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=61)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**ATTN, intermediate_size=24, num_local_experts=4),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **ATTN, head_dim=8, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=True,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **ATTN, moe_intermediate_size=20, shared_expert_intermediate_size=28, num_experts=5,
        num_experts_per_tok=2,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **ATTN, intermediate_size=24, num_experts=8, num_experts_per_tok=2
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **ATTN, intermediate_size=40, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    ),
}  # fmt: skip


def _model(family: str, device=DEV):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    with torch.no_grad():  # random (not zero) expert weights: every path carries signal
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0.0, 0.2)
    return model


def _step(model, implementation: str, dtype=torch.float32, tokens=(2, 9)):
    model = copy.deepcopy(model).to(dtype)
    model.set_experts_implementation(implementation)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, tokens, generator=g).to(model.device)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_model_equals_eager_experts(family, backend):
    hf.register(backend=backend)
    model = _model(family)
    want_logits, want_grads = _step(model, "eager")
    with mock.patch.object(hf, "activation_of", side_effect=hf.activation_of) as spy:
        got_logits, got_grads = _step(model, hf.NAME)
    moe_layers = sum(type(m).__name__.endswith("Experts") for m in model.modules())
    assert spy.call_count == moe_layers > 0  # every experts module ran through flashfusemoe, once
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    assert any("experts" in n for n in got_grads)
    for name, want in want_grads.items():
        msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-5, msg=msg)


def _eager(experts):
    experts.config = copy.copy(experts.config)  # this copy's own choice, not the model's
    experts.config._experts_implementation = "eager"
    return experts


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    "backend, device",
    [pytest.param("triton", "cuda", marks=pytest.mark.gpu), ("torch", "cpu")],
)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_experts_bf16_within_tolerance_rule(family, backend, device):
    """One experts module of each family, bf16 (triton on a GPU; the torch backend on CPU, which checks
    the integration's bf16 path in CI): output and the gradients of x, the weights and both
    projections; error vs HF's fp32 eager at most twice HF eager bf16's own error plus one bf16
    rounding of the largest reference value (the rule at the kernels' boundary; the fp32 model-level
    equivalence is test_hf_model_equals_eager_experts; docs/guide.md says why not a whole bf16 model)."""
    hf.register(backend=backend)
    experts = next(
        m for m in _model(family, torch.device(device)).modules() if type(m).__name__.endswith("Experts")
    )
    E, H = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    g = torch.Generator(device=device).manual_seed(3)
    x0 = torch.randn(256, H, device=device, generator=g)
    ids = torch.rand(256, E, device=device, generator=g).topk(2, -1).indices
    w0 = torch.rand(256, 2, device=device, generator=g)
    cot = torch.randn(256, H, device=device, generator=g)

    def run(dtype, impl):
        mod = copy.deepcopy(experts).to(dtype)
        x, w = (t.to(dtype).detach().clone().requires_grad_() for t in (x0, w0))
        out = hf.experts_forward(mod, x, ids, w) if impl == "ours" else _eager(mod)(x, ids, w)
        (out.float() * cot).sum().backward()
        return [out, x.grad, w.grad, mod.gate_up_proj.grad, mod.down_proj.grad]

    ref, own, got = run(torch.float32, "eager"), run(torch.bfloat16, "eager"), run(torch.bfloat16, "ours")
    for name, r, o, t in zip(
        ["out", "x", "weights", "gate_up_proj", "down_proj"], ref, own, got, strict=True
    ):
        bound = 2 * _max_err(o, r) + 2.0**-8 * r.abs().max().item()
        assert _max_err(t, r) <= bound, f"{name}: {_max_err(t, r):.3e} > {bound:.3e}"


def _experts(family: str):
    return next(m for m in _model(family).modules() if type(m).__name__.endswith("Experts"))


def test_expert_parallel_sentinels_are_masked():
    """ids >= num_experts with weight 0 (HF's EP convention) contribute nothing."""
    hf.register(backend="torch")
    experts = _experts("mixtral")
    x = torch.randn(5, 32, device=DEV)
    ids = torch.tensor([[0, 1], [2, 4], [4, 3], [1, 4], [4, 4]], device=DEV)
    w = torch.rand(5, 2, device=DEV)
    got = hf.experts_forward(experts, x, ids, torch.where(ids < 4, w, 0.0))
    kept = torch.where(ids < 4, ids, 0)
    want = hf.experts_forward(experts, x, kept, torch.where(ids < 4, w, 0.0))  # sentinel -> weight-0 expert 0
    torch.testing.assert_close(got, want)


def test_unsupported_experts_are_refused_by_name():
    hf.register(backend="torch")
    gpt_oss = transformers.GptOssConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, vocab_size=61,
    )  # fmt: skip
    experts = next(
        m for m in transformers.AutoModelForCausalLM.from_config(gpt_oss).modules()
        if type(m).__name__ == "GptOssExperts"
    )  # fmt: skip
    with pytest.raises(ValueError, match="GptOssExperts: expert biases are not supported.*grouped_mm"):
        hf.activation_of(experts)
    mixtral = _experts("mixtral")
    mixtral.act_fn = transformers.activations.ACT2FN["gelu_pytorch_tanh"]
    match = r"MixtralExperts.act_fn is GELUTanh: 'flashfusemoe' supports \['gelu'"
    with pytest.raises(ValueError, match=match):
        hf.activation_of(mixtral)


def test_import_flashfusemoe_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, flashfusemoe; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        hf.register(backend="nope")


def test_hf_model_compiles_whole_with_our_experts():
    """torch.compile(fullgraph=True) over a HF model whose experts run through the triton backend (its
    custom ops trace; the CPU interpreter here): the compiled loss equals eager's and backpropagates."""
    hf.register(backend="triton")
    model = _model("qwen3_moe")
    model.set_experts_implementation(hf.NAME)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    want = model(input_ids=ids, labels=ids).loss
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


def test_experts_under_autocast_equal_the_call_on_cast_operands():
    """fp32 experts inside torch.autocast (bf16): what HF's grouped_mm experts do under autocast, from
    the cast operands, bit for bit; fp32 gradients for the fp32 weights (backward outside autocast)."""
    hf.register(backend="torch")
    experts = _experts("qwen3_moe")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 32, generator=g, requires_grad=True)
    ids = torch.rand(7, 6, generator=g).topk(3, -1).indices
    w = torch.rand(7, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hf.experts_forward(experts, x, ids, w)
    got.float().square().sum().backward()
    cast = copy.deepcopy(experts).to(torch.bfloat16)
    xb = x.detach().bfloat16().requires_grad_()
    want = hf.experts_forward(cast, xb, ids, w)
    want.float().square().sum().backward()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=0, atol=0)
    for name in ("gate_up_proj", "down_proj"):
        mine, theirs = getattr(experts, name).grad, getattr(cast, name).grad
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=0, msg=name)
