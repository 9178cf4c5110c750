"""Fused decode layers (`align_cli.fused_decode`, `align_cli.decode_kernels`): fast generation's decode steps with
the decoder layers as the fused layer instead of the model's code.

On CPU the fused layer runs as its torch ops (`ALIGN_FAST_LAYERS=1` / `fused_layers=True`): for every
architecture it covers, tokens and log-probs equal those of the model's own layer code on the fast path (itself
checked against `generate` in test_fast_generation.py) and greedy tokens equal `generate`, with stops, refills,
HAPO's adaptive temperature, APO's partner model and live weight changes; models it does not cover keep the
model's code and say why. On a GPU (marker `gpu`): each Triton kernel against the torch ops in float32 and bf16,
and fast generation with the kernels against the trainer's scoring of the same tokens."""

import copy

import pytest
import torch
from align_cli.losses.hapo import EntropyStats
from test_fused_projections import ARCHITECTURES  # llama (all biases), qwen2, qwen3, mistral

from align_cli import decode_kernels, fused_decode
from align_cli.fast_generation import AdaptiveSampling, Sampling, _SlotCache, fast_generate
from align_cli.fused_projections import fuse_projections

VOCAB = 64
PROMPTS = [[1, 7, 9, 11], [1, 20, 30], [1, 40, 41, 42, 43, 44, 45], [2, 3]]
STOPS = set(range(5, VOCAB, 4))
# head_dim 32 for every architecture: the smallest the kernels take (two halves of 16 for the rotary
# embedding's tl.dot tiles)
SMALL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, eos_token_id=5, pad_token_id=0)


def _build(name, dtype=torch.float32, device="cpu", **overrides):
    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(3)
    built = model_class(config_class(**{**extra, **SMALL, **overrides}))  # SMALL's head_dim over qwen3's 16.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for parameter in built.parameters():  # non-zero biases and norm weights other than one
            parameter.add_(torch.randn_like(parameter) * 0.05)
        built.lm_head.weight.mul_(4.0)  # sharper logits: samples spread unevenly, stops come early
    return built


def _max_gap(a, b):
    return max((abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t)), default=0.0)


def _both(model, sampling, **kwargs):
    own = fast_generate(model, PROMPTS, 2, 12, sampling, STOPS, max_slots=3, fused_layers=False, **kwargs)
    fused = fast_generate(model, PROMPTS, 2, 12, sampling, STOPS, max_slots=3, fused_layers=True, **kwargs)
    return own, fused


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fused_layers_give_the_tokens_and_log_probs_of_the_model_layers(name):
    model = _build(name)
    for sampling in (Sampling(0.0), Sampling(1.0, 1.0, seed=5)):
        own, fused = _both(model, sampling)
        assert fused.stats["fused_layers"].startswith("on: torch ops") and fused.stats["fused_layer_batches"]
        assert own.stats["fused_layer_batches"] == [] and own.stats["fused_layers"].startswith("off")
        assert fused.tokens == own.tokens and fused.stopped == own.stopped
        assert any(fused.stopped)   # stops, and refills of the 3 slots by the 8 sequences, were exercised
        assert _max_gap(fused.tempered_logps, own.tempered_logps) < 1e-5
        assert _max_gap(fused.sampling_logps, own.sampling_logps) < 1e-5


def test_fused_layers_greedy_tokens_equal_generate():
    model = _build("qwen3")
    out = fast_generate(model, PROMPTS, 1, 10, Sampling(0.0), {5}, fused_layers=True)
    assert out.stats["fused_layer_batches"]
    for prompt, tokens in zip(PROMPTS, out.tokens):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=5,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        if 5 in expected:
            expected = expected[: expected.index(5) + 1]
        assert tokens == expected


def test_fused_layers_with_hapo_and_apo_samplers():
    model = _build("qwen2")
    adaptive = AdaptiveSampling(0.3, "paper", EntropyStats(1.0, 0.5, 2.0, -2.0))
    own, fused = _both(model, Sampling(0.8, 1.0, seed=2, adaptive=adaptive))
    assert fused.stats["fused_layer_batches"] and fused.tokens == own.tokens
    assert _max_gap(fused.temperature_factors, own.temperature_factors) < 1e-5
    previous = _build("qwen2")
    with torch.no_grad():
        for parameter in previous.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    own, fused = _both(model, Sampling(1.0, 1.0, seed=4), extrapolation=(previous, 0.5))
    assert fused.stats["fused_layer_batches"] and fused.tokens == own.tokens
    assert _max_gap(fused.tempered_logps, own.tempered_logps) < 1e-5


def test_fused_layers_decode_the_live_weights():
    model = _build("llama")
    before = fast_generate(model, PROMPTS, 1, 8, Sampling(0.0), set(), fused_layers=True).tokens
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
            layer.self_attn.v_proj.weight.mul_(2.0)
    own = fast_generate(model, PROMPTS, 1, 8, Sampling(0.0), set(), fused_layers=False).tokens
    after = fast_generate(model, PROMPTS, 1, 8, Sampling(0.0), set(), fused_layers=True).tokens
    assert after == own and after != before


@pytest.mark.parametrize("change, reason", [
    ({"head_dim": 16}, "head_dim 16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
])
def test_layers_the_kernels_do_not_compute_keep_the_model_code(change, reason):
    model = _build("llama", **change)
    out = fast_generate(model, PROMPTS, 1, 6, Sampling(0.0), set(), fused_layers=True)
    assert reason in out.stats["fused_layers"] and out.stats["fused_layer_batches"] == []
    assert out.tokens == fast_generate(model, PROMPTS, 1, 6, Sampling(0.0), set(), fused_layers=False).tokens


def test_unfused_or_lora_projections_keep_the_model_code():
    from peft import LoraConfig, get_peft_model

    out = fast_generate(_build("qwen2"), PROMPTS, 1, 6, Sampling(0.0), set(), fuse=False, fused_layers=True)
    assert "not fused" in out.stats["fused_layers"]
    lora = get_peft_model(_build("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = fast_generate(lora, PROMPTS, 1, 6, Sampling(0.0), set(), fuse=True, fused_layers=True)
    assert "not fused" in out.stats["fused_layers"] and out.stats["fused_layer_batches"] == []


def test_the_environment_picks_the_default(monkeypatch):
    model = _build("qwen2")
    monkeypatch.setenv("ALIGN_FAST_LAYERS", "auto")   # auto: CUDA with Triton only
    assert fast_generate(model, PROMPTS, 1, 4, Sampling(0.0), set()).stats["fused_layers"].startswith("auto")
    monkeypatch.setenv("ALIGN_FAST_LAYERS", "1")
    assert fast_generate(model, PROMPTS, 1, 4, Sampling(0.0), set()).stats["fused_layer_batches"]
    monkeypatch.setenv("ALIGN_FAST_LAYERS", "0")
    assert fast_generate(model, PROMPTS, 1, 4, Sampling(0.0), set()).stats["fused_layers"].startswith("off")


def test_steps_above_the_batch_limit_keep_the_model_code(monkeypatch):
    monkeypatch.setattr(fused_decode, "MAX_BATCH", 8)
    out = fast_generate(_build("qwen2"), PROMPTS, 4, 12, Sampling(1.0, 1.0, seed=1), STOPS, fused_layers=True)
    assert out.stats["graph_batches"] == [8, 16] and out.stats["fused_layer_batches"] == [8]


# ------------------------------------------------------------------------------------------------------ GPU

def _random_cache(plan, dtype, device, slots=72, max_len=320):
    generator = torch.Generator(device=device).manual_seed(7)
    cache = _SlotCache(len(plan.layers), slots, plan.kv_heads, max_len, plan.head_dim, dtype, device)
    for tensor in cache.keys + cache.values:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device).to(dtype))
    return cache


def kernels_against_torch_ops(name, dtype, shape, device="cuda", batches=(1, 7, 32, 64)):
    """Per batch: mean |kernels - truth| and mean |torch ops - truth| of the final norm's output, where truth is
    the torch ops in float32 on the same (rounded) weights and cache. In float32 the kernels must also agree
    with the torch ops elementwise, outputs and the caches written."""
    model = _build(name, dtype=dtype, device=device, **shape)
    exact = copy.deepcopy(model).float()
    with fuse_projections(model, exact), torch.no_grad():
        plans = [fused_decode.build_plan(model.model, model.lm_head, model.config, 320, 0, kernels)
                 for kernels in (False, True)]
        truth_plan = fused_decode.build_plan(exact.model, exact.lm_head, exact.config, 320, 0, False)
        for batch in batches:
            generator = torch.Generator(device=device).manual_seed(batch)
            tokens = torch.randint(0, VOCAB, (batch,), generator=generator, device=device)
            positions = torch.randint(0, 320, (batch,), generator=generator, device=device)
            positions[0], positions[-1] = 0, 319   # a slot's first token, and a full slot
            results = []
            for plan, cache_dtype in ((truth_plan, torch.float32), (plans[0], dtype), (plans[1], dtype)):
                cache = _random_cache(plan, dtype, device)
                cache.keys = [t.to(cache_dtype) for t in cache.keys]
                cache.values = [t.to(cache_dtype) for t in cache.values]
                results.append((fused_decode.decode_hidden(plan, tokens, positions, cache).float(), cache))
            (truth, _), (h_ref, cache_ref), (h_kernel, cache_kernel) = results
            yield batch, (h_kernel - truth).abs().mean().item(), (h_ref - truth).abs().mean().item()
            if dtype == torch.float32:
                torch.testing.assert_close(h_kernel, h_ref, atol=1e-4, rtol=1e-4)
                for ref, got in zip(cache_ref.keys + cache_ref.values, cache_kernel.keys + cache_kernel.values):
                    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not decode_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                        intermediate_size=1536),
                                   dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                        intermediate_size=2816)])
def test_kernels_equal_the_torch_layer(name, dtype, shape):
    """Two layers; hidden sizes that are no multiple of the K tiles, 3 query heads per key head, batches 1..64.
    bf16: the kernels' error against float32 is that of the torch ops in bf16 (which round where they round)."""
    for batch, kernel_error, torch_error in kernels_against_torch_ops(name, dtype, shape):
        if dtype == torch.float32:
            assert kernel_error < 1e-5, (batch, kernel_error)
        else:
            assert kernel_error < 1.5 * torch_error + 1e-4, (batch, kernel_error, torch_error)


@pytest.mark.gpu
@pytest.mark.skipif(not decode_kernels.AVAILABLE, reason="needs Triton")
def test_kernel_rollouts_score_like_the_trainer_on_the_gpu():
    """bf16, compiled and captured steps: the sampler's log-probs against a full-sequence forward of the model
    (the trainer's scoring) are as close with the kernels as with the model's own layer code."""
    model = _build("qwen2", dtype=torch.bfloat16, device="cuda", hidden_size=896, num_attention_heads=14,
                   num_key_value_heads=2, intermediate_size=4864, num_hidden_layers=4, vocab_size=512)
    prompts = [[1 + (7 * i + j) % 500 for j in range(20 + i)] for i in range(8)]

    def gap(fused_layers):
        out = fast_generate(model, prompts, 4, 48, Sampling(1.0, 1.0, seed=3), set(), fused_layers=fused_layers)
        assert out.stats["graphs"] >= 1 and not out.stats.get("compile_error")
        gaps = []
        with torch.no_grad():
            for index, tokens in enumerate(out.tokens):
                prompt = prompts[index // 4]
                logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1:-1].float()
                scored = logits.log_softmax(-1).gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
                gaps.append((scored - torch.tensor(out.tempered_logps[index], device="cuda")).abs().mean().item())
        return out.stats, sum(gaps) / len(gaps)

    stats, kernels = gap(True)
    assert stats["fused_layers"] == "on: Triton kernels" and stats["fused_layer_batches"] == [32]
    assert not stats.get("fused_layers_error")
    _, own = gap(False)
    assert kernels < 1.5 * own + 1e-3, (kernels, own)


def test_tile_shapes_from_the_environment(monkeypatch):
    saved = dict(decode_kernels.TILES)
    try:
        monkeypatch.setenv("ALIGN_DECODE_TILES", '{"down": [16, 128, 4, 8, 2], "nonsense": [1]}')
        decode_kernels._tiles_from_environment()
        assert decode_kernels.TILES["down"] == decode_kernels.Tiles(16, 128, 4, 8, 2)
        assert "nonsense" not in decode_kernels.TILES
        monkeypatch.setenv("ALIGN_DECODE_TILES", '{"down": [16, "x", 4, 8')
        with pytest.warns(UserWarning, match="ALIGN_DECODE_TILES"):
            decode_kernels._tiles_from_environment()
        assert decode_kernels.TILES["down"] == decode_kernels.Tiles(16, 128, 4, 8, 2)
        # the splits of a K: whole tiles per split, no split empty
        tiles = decode_kernels.Tiles(32, 128, 16)
        assert decode_kernels.slice_length(4864, tiles) == 384 and decode_kernels.splits_of(4864, tiles) == 13
        assert decode_kernels.splits_of(896, decode_kernels.Tiles(32, 64, 8)) == 7
    finally:
        decode_kernels.TILES.clear()
        decode_kernels.TILES.update(saved)
