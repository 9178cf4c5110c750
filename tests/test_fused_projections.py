"""q/k/v and gate/up as one GEMM each on the fast decode path (`align_cli.fused_projections`): the model's
outputs and the fast path's tokens equal the unfused ones for every architecture the fast path supports, the
model is left as it was, LoRA-wrapped projections stay unfused, and a compiled step does not recompile."""

import pytest
import torch
from test_fast_generation import PROMPTS, VOCAB, _dynamo_graphs, model  # noqa: F401 - the tiny Llama fixture
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from align_cli import fast_generation
from align_cli.fast_generation import Sampling, fast_generate
from align_cli.fused_projections import fusable_groups, fuse_projections

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, eos_token_id=5, pad_token_id=0)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),   # q/k/v with biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),   # q/k norms after the projections
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def _build(name):
    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(3)
    built = model_class(config_class(**SMALL, **extra)).eval()
    with torch.no_grad():
        for parameter in built.parameters():  # non-zero biases, so a misplaced bias slice shows
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return built


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fused_forward_equals_the_model_and_leaves_it_as_it_was(name):
    built = _build(name)
    ids = torch.tensor([[1, 7, 9, 11, 13, 2]])
    names_before = [n for n, _ in built.named_parameters()]
    state_before = {k: v.clone() for k, v in built.state_dict().items()}
    with torch.no_grad():
        expected = built(ids).logits
        with fuse_projections(built) as fused:
            assert fused == 2 * SMALL["num_hidden_layers"]   # one q/k/v and one gate/up group per layer
            got = built(ids).logits
            # the copies are no parameters (the stood-in projections are out of the module tree meanwhile)
            assert set(n for n, _ in built.named_parameters()) < set(names_before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in built.named_parameters()] == names_before
    assert all(torch.equal(v, state_before[k]) for k, v in built.state_dict().items())
    assert all(type(getattr(built.model.layers[0].self_attn, p)) is torch.nn.Linear for p in ("q_proj", "k_proj"))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fast_path_tokens_with_fused_projections_equal_the_unfused(name):
    built = _build(name)
    stops = set(range(5, VOCAB, 4))
    for sampling in (Sampling(0.0), Sampling(1.0, 1.0, seed=5)):
        plain = fast_generate(built, PROMPTS, 2, 12, sampling, stops, max_slots=3, fuse=False)
        fused = fast_generate(built, PROMPTS, 2, 12, sampling, stops, max_slots=3, fuse=True)
        assert fused.stats["fused_groups"] == 4 and plain.stats["fused_groups"] == 0
        assert fused.tokens == plain.tokens and fused.stopped == plain.stopped
        assert max(abs(a - b) for x, y in zip(fused.tempered_logps, plain.tempered_logps)
                   for a, b in zip(x, y)) < 1e-4


def test_the_fused_copies_follow_the_live_weights(model):
    sampling = Sampling(0.0)
    before = fast_generate(model, PROMPTS, 1, 8, sampling, set(), fuse=True).tokens
    layer = model.model.layers[0]
    with torch.no_grad():
        saved = layer.self_attn.k_proj.weight.clone(), layer.mlp.up_proj.weight.clone()
        layer.self_attn.k_proj.weight.mul_(-3.0)   # a training step would change them in place
        layer.mlp.up_proj.weight.mul_(-3.0)
    try:
        changed = fast_generate(model, PROMPTS, 1, 8, sampling, set(), fuse=True).tokens
        unfused = fast_generate(model, PROMPTS, 1, 8, sampling, set(), fuse=False).tokens
        assert changed == unfused and changed != before
    finally:
        with torch.no_grad():
            layer.self_attn.k_proj.weight.copy_(saved[0])
            layer.mlp.up_proj.weight.copy_(saved[1])


def test_lora_wrapped_projections_stay_unfused(model):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    groups = {names for _, names in fusable_groups(lora)}
    assert groups == {("gate_proj", "up_proj")}   # q/v are LoRA layers now: that group keeps its own forward
    plain = fast_generate(lora, PROMPTS, 1, 8, Sampling(0.0), set(), fuse=False)
    fused = fast_generate(lora, PROMPTS, 1, 8, Sampling(0.0), set(), fuse=True)
    assert fused.stats["fused_groups"] == 2 and fused.tokens == plain.tokens


def test_compiled_fused_step_matches_and_is_reused_across_calls(model):
    compiled = fast_generation.Compile(backend="aot_eager")
    sampling = Sampling(1.0, 1.0, seed=7)
    eager = fast_generate(model, PROMPTS, 2, 10, sampling, {5}, compile_step=False, fuse=True)
    out = fast_generate(model, PROMPTS, 2, 10, sampling, {5}, compile_step=compiled, fuse=True)
    assert out.stats["compiled"] >= 1 and "compile_error" not in out.stats
    assert out.tokens == eager.tokens
    graphs = _dynamo_graphs()
    again = fast_generate(model, PROMPTS, 2, 10, sampling, {5}, compile_step=compiled, fuse=True)
    assert again.tokens == eager.tokens and _dynamo_graphs() == graphs   # new copies, same stand-ins


def test_fuse_setting_from_the_environment(monkeypatch):
    for value, expected in (("0", "off"), ("1", "on"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv("ALIGN_FAST_FUSE", value)
        assert fast_generation.fuse_mode() == expected
