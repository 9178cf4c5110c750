"""The fast generation path (`align_cli.fast_generation`) on CPU against independent references: greedy
tokens against plain `generate`, sampled first tokens against the exact tempered top-p softmax, continuous
batching with early stops against one sequence at a time, seeds per prompt whatever else runs beside it,
log-probs against the trainer's scoring, and the choice of path (sharded weights, processors, settings)."""

import tempfile

import pytest
import torch
from test_rl_trainer import rl_recipe  # noqa: F401 - the online-RL recipe fixture
from transformers import LlamaConfig, LlamaForCausalLM, TopPLogitsWarper

from align_cli import fast_generation
from align_cli.fast_generation import Sampling, blocker, fast_generate, top_p_filter

VOCAB = 64
PROMPTS = [[1, 7, 9, 11], [1, 20, 30], [1, 40, 41, 42, 43, 44, 45], [2, 3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=5, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so samples spread unevenly over the vocabulary
        model.lm_head.weight.mul_(8.0)
    return model


def test_greedy_matches_generate(model):
    out = fast_generate(model, PROMPTS, 2, 12, Sampling(0.0), {5}, max_slots=3)
    for index, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        reference = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=5, pad_token_id=0)
        expected = reference[0, len(prompt):].tolist()
        if 5 in expected:  # generate pads after EOS; ours keeps the sequence up to and including it
            expected = expected[: expected.index(5) + 1]
        assert out.tokens[2 * index] == expected and out.tokens[2 * index + 1] == expected
        assert out.stopped[2 * index] == (expected[-1] == 5)


def _exact_first_token(model, prompt, temperature, top_p):
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    warped = TopPLogitsWarper(top_p)(None, (logits / temperature)[None])[0]
    return warped.softmax(-1)


def test_sampled_first_tokens_follow_the_tempered_top_p_softmax(model):
    prompt, temperature, top_p, n = PROMPTS[0], 0.7, 0.9, 6000
    out = fast_generate(model, [prompt], n, 1, Sampling(temperature, top_p, seed=3), set())
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=VOCAB).double()
    exact = _exact_first_token(model, prompt, temperature, top_p).double()
    assert counts[exact == 0].sum() == 0  # nothing outside the top-p set
    total_variation = 0.5 * (counts / n - exact).abs().sum()
    # sampling noise: E[TV] <= 0.5 * sqrt(support / n) ~ 0.04 here; a wrong temperature is far off
    wrong = _exact_first_token(model, prompt, 1.0, top_p).double()
    assert 0.5 * (wrong - exact).abs().sum() > 0.15
    assert total_variation < 0.07, total_variation
    # the log-probs returned are those of the distribution each token was drawn from
    drawn = torch.tensor([t[0] for t in out.tokens])
    assert torch.allclose(torch.tensor([lp[0] for lp in out.sampling_logps]).double(), exact[drawn].log(), atol=1e-4)


def test_top_p_filter_matches_transformers_warper():
    torch.manual_seed(1)
    logits = torch.randn(6, 3000) * 3
    for top_p in (0.3, 0.9, 0.999):
        reference = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, top_p).isinf(), reference.isinf())
    flat = torch.zeros(2, 3000)  # near-uniform: the top-k candidates hold < top_p, the full sort runs
    assert torch.equal(top_p_filter(flat, 0.9).isinf(), TopPLogitsWarper(0.9)(None, flat.clone()).isinf())


def test_continuous_batching_with_early_stops_matches_one_at_a_time(model):
    stops = set(range(8, 24))  # a quarter of the vocabulary: sequences stop at many different lengths
    sampling = Sampling(1.0, 1.0, seed=11)
    together = fast_generate(model, PROMPTS, 4, 40, sampling, stops, max_slots=3)  # slots refilled
    alone = fast_generate(model, PROMPTS, 4, 40, sampling, stops, max_slots=1)
    everything = fast_generate(model, PROMPTS, 4, 40, sampling, stops)
    assert together.tokens == alone.tokens == everything.tokens
    assert together.stopped == alone.stopped
    lengths = [len(t) for t in together.tokens]
    assert len(set(lengths)) >= 4 and any(together.stopped) and min(lengths) < 40
    for tokens, stopped in zip(together.tokens, together.stopped):
        assert stopped == (tokens[-1] in stops) and not any(t in stops for t in tokens[:-1])
    assert together.stats["prefill_forwards"] > 1  # refills happened


def test_seeds_are_per_prompt_whatever_runs_beside_it(model):
    sampling = Sampling(1.0, 0.95, seed=5)
    base = fast_generate(model, PROMPTS[:3], 3, 16, sampling, {5})
    more = fast_generate(model, PROMPTS + [[3, 4, 5]], 3, 16, sampling, {5}, max_slots=5)
    assert more.tokens[:9] == base.tokens
    other_seed = fast_generate(model, PROMPTS[:3], 3, 16, Sampling(1.0, 0.95, seed=6), {5})
    assert other_seed.tokens != base.tokens
    assert len({tuple(t) for t in base.tokens[:3]}) == 3  # the samples of one prompt differ


def test_rollouts_fast_path_keeps_stops_and_matches_the_trainer_scores(tiny_model_dir, tokenizer):
    from align_cli.rl.rollout import generate_rollouts, score, stop_token_ids

    policy = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(3)]
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=1.0, seed=2, batch_size=2)
    fast = generate_rollouts(policy, tokenizer, rows, 4, fast=True, **kwargs)
    slow = generate_rollouts(policy, tokenizer, rows, 4, fast=False, **kwargs)
    assert fast.prompt_ids == slow.prompt_ids and fast.sampler_logps is not None and slow.sampler_logps is None
    stops = stop_token_ids(policy, tokenizer)
    for tokens, cut_short in zip(fast.completion_ids, fast.truncated.tolist()):
        assert cut_short == (tokens[-1] not in stops) and not any(t in stops for t in tokens[:-1])
        assert cut_short or len(tokens) <= 12
    trainer, _ = score(policy, fast, tokenizer.pad_token_id, fused=False, with_entropy=False, temperature=0.8)
    for row, values in enumerate(fast.sampler_logps):
        assert torch.allclose(torch.tensor(values), trainer[row, : len(values)], atol=1e-4)
    assert fast.select([1, 0]).sampler_logps == [fast.sampler_logps[1], fast.sampler_logps[0]]


def test_engine_generate_fast_matches_generate_greedy(tiny_model_dir, tokenizer):
    from align_cli.generation import SamplingSettings, generate

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], "Plain text prompt:", "Another, longer plain prompt"]
    settings = SamplingSettings(max_new_tokens=8, batch_size=2)
    assert generate(model, tokenizer, prompts, settings, "Be brief.", fast=True) == \
        generate(model, tokenizer, prompts, settings, "Be brief.", fast=False)


def test_the_path_each_request_takes(model, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from align_cli.rl.temperature import AdaptiveTemperature

    assert blocker(model) is None
    assert "model type 'gpt2'" in blocker(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    assert blocker(model, [AdaptiveTemperature(None, 0.1)]) is None  # HAPO has a fast equivalent
    assert "logits processor" in blocker(model, [lambda input_ids, scores: scores])  # APO's kind has none
    model.generation_config.repetition_penalty = 1.1
    try:
        assert "repetition_penalty" in blocker(model)
    finally:
        model.generation_config.repetition_penalty = 1.0
    monkeypatch.setenv("ALIGN_FAST_GENERATION", "auto")
    assert fast_generation.wanted(model) == torch.cuda.is_available()
    monkeypatch.setenv("ALIGN_FAST_GENERATION", "1")
    assert fast_generation.wanted(model)
    monkeypatch.setenv("ALIGN_FAST_GENERATION", "0")
    assert not fast_generation.wanted(model)


def test_sharded_weights_take_the_slow_path(tiny_model_dir, tokenizer):
    """FSDP2 on one CPU rank (gloo): parameters are DTensors, so rollouts go through `generate`, whose module
    hooks gather them, even when the fast path is asked for."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from align_cli.rl.rollout import generate_rollouts

    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        policy = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        mesh = init_device_mesh("cpu", (1,))
        for layer in policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        assert "sharded" in blocker(policy)
        rows = [{"prompt": "Count: one, two,"}]
        rollouts = generate_rollouts(policy, tokenizer, rows, 2, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                     seed=0, batch_size=1, fast=True)
        assert len(rollouts) == 2 and rollouts.sampler_logps is None  # the slow path served it
    finally:
        dist.destroy_process_group()


def test_two_level_inverse_cdf_is_the_full_inverse_cdf():
    from align_cli.fast_generation import inverse_cdf

    torch.manual_seed(2)
    logits = torch.randn(300, 5000) * 4
    logits[:, ::3] = -float("inf")  # tokens without mass are never drawn, also at chunk edges
    probabilities = logits.softmax(-1)
    u = torch.rand(300)
    drawn = inverse_cdf(probabilities, u, chunk=128)
    full = probabilities.double().cumsum(-1)
    reference = torch.searchsorted(full, (u.double() * full[:, -1])[:, None], right=True).squeeze(1)
    assert (drawn == reference).float().mean() >= 0.99  # float32 sums may move a draw lying on a boundary
    assert bool((probabilities.gather(1, drawn[:, None]) > 0).all())
    assert inverse_cdf(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([0.999999]), chunk=2).item() == 2


def test_lora_policy_greedy_matches_generate(model):
    """A LoRA-wrapped policy (the online-RL setup with peft): the adapters' current weights are sampled."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    policy = get_peft_model(LlamaForCausalLM(model.config).eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                              init_lora_weights=False))
    assert blocker(policy) is None
    out = fast_generate(policy, PROMPTS[:2], 1, 8, Sampling(0.0), {5})
    for index, prompt in enumerate(PROMPTS[:2]):
        ids = torch.tensor([prompt])
        reference = policy.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=5, pad_token_id=0)
        expected = reference[0, len(prompt):].tolist()
        assert out.tokens[index] == (expected[: expected.index(5) + 1] if 5 in expected else expected)
    with policy.disable_adapter():  # the adapters matter: without them the tokens differ
        assert fast_generate(policy, PROMPTS[:2], 1, 8, Sampling(0.0), {5}).tokens != out.tokens


def test_online_run_on_the_fast_path_logs_the_sampler_gap(rl_recipe, tmp_path, monkeypatch, capsys):
    """An online GRPO run with the fast path forced on CPU: rollouts and the task evaluation take it, and the
    trainer's pi_old scores match the sampler's log-probs of the same tokens (float32)."""
    import json

    from conftest import align

    monkeypatch.setenv("ALIGN_FAST_GENERATION", "1")
    monkeypatch.chdir(tmp_path)
    path = rl_recipe(passes=2)
    code, _, err = align(monkeypatch, capsys, "train", str(path))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all(r["generation/logp_gap"] < 1e-4 for r in train)


def test_hapo_run_with_adaptive_temperature_on_the_fast_path(rl_recipe, tmp_path, monkeypatch, capsys):
    """HAPO with its adaptive temperature, fast path forced on CPU: step 2 samples at the temperatures step 1's
    entropies set (a factor other than 1 is logged), and pi_old, scored at each token's recorded temperature,
    matches the sampler."""
    import json

    from conftest import align

    monkeypatch.setenv("ALIGN_FAST_GENERATION", "1")
    monkeypatch.chdir(tmp_path)
    path = rl_recipe(loss="hapo", passes=2, temperature=0.7,
                     hapo={"adaptive_temperature": True, "token_level_advantage": True})
    code, _, err = align(monkeypatch, capsys, "train", str(path), "--set", "output.save_final_model=false",
                         "--set", "evaluation.task=null")
    assert code == 0, err
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert len(train) == 2 and all(r["generation/logp_gap"] < 1e-4 for r in train)
    assert "hapo/temperature_factor" not in train[0] and train[1]["hapo/temperature_factor"] != 1.0


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decode_step_gives_the_uncompiled_tokens_and_is_reused_across_calls(model):
    # aot_eager: dynamo's trace and AOTAutograd's functionalisation of the in-place slot writes (what decides
    # the tokens), without inductor's minutes of C++ compilation on a CPU
    compiled = fast_generation.Compile(backend="aot_eager")
    stops = set(range(5, VOCAB, 4))
    for sampling in (Sampling(0.0), Sampling(1.0, 1.0, seed=4)):
        eager = fast_generate(model, PROMPTS, 3, 20, sampling, stops, max_slots=5, compile_step=False)
        out = fast_generate(model, PROMPTS, 3, 20, sampling, stops, max_slots=5, compile_step=compiled)
        assert out.stats["compiled"] >= 1 and "compile_error" not in out.stats and "compiled" not in eager.stats
        assert out.tokens == eager.tokens and out.stopped == eager.stopped
        assert max(abs(a - b) for x, y in zip(out.tempered_logps, eager.tempered_logps)
                   for a, b in zip(x, y)) < 1e-5
        graphs = _dynamo_graphs()
        again = fast_generate(model, PROMPTS, 3, 20, sampling, stops, max_slots=5, compile_step=compiled)
        assert again.tokens == eager.tokens and _dynamo_graphs() == graphs  # new slots, closures: no recompile


def test_a_decode_step_that_fails_to_compile_runs_uncompiled(model):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    sampling = Sampling(1.0, 1.0, seed=2)
    eager = fast_generate(model, PROMPTS, 2, 10, sampling, {5}, compile_step=False)
    out = fast_generate(model, PROMPTS, 2, 10, sampling, {5}, compile_step=fast_generation.Compile(broken_backend))
    assert "no compiler on this machine" in out.stats["compile_error"] and out.stats["compiled"] == 0
    assert out.tokens == eager.tokens and out.sampling_logps == eager.sampling_logps


@pytest.mark.slow
def test_inductor_compiled_greedy_decode_gives_the_uncompiled_tokens():
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         eos_token_id=5, pad_token_id=0)
    tiny = LlamaForCausalLM(config).eval()
    eager = fast_generate(tiny, PROMPTS, 1, 8, Sampling(0.0), set(), compile_step=False)
    out = fast_generate(tiny, PROMPTS, 1, 8, Sampling(0.0), set(), compile_step=True)  # inductor, C++ on CPU
    assert out.stats["compiled"] == 1 and out.tokens == eager.tokens


def test_compile_setting_from_the_environment(monkeypatch):
    for value, expected in (("0", "off"), ("1", "on"), ("auto", "auto"), ("", "auto"),
                            ("autotune", "autotune"), ("max-autotune", "autotune"), ("combo", "combo")):
        monkeypatch.setenv("ALIGN_FAST_COMPILE", value)
        assert fast_generation.compile_mode() == expected


def _hapo_reference(model, prompt, tokens, temperature, processor):
    """Per completion token, (factor, untempered entropy, log-prob under softmax(z / (T * factor))) from one full
    forward of prompt + completion through the `generate` path's own processor (`rl.temperature`)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    scores = processor(None, logits.float())  # each completion position as one row of a decoding step
    factors, entropies = processor.take_records()  # [positions, 1]
    logps = torch.log_softmax(scores / temperature, dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    return factors[:, 0], entropies[:, 0], logps


def test_hapo_adaptive_temperature_on_the_fast_path_matches_the_processor(model):
    """HAPO's temperature computed inside the decode step: each token's factor, untempered entropy and
    log-prob under softmax(z / (T * factor)) equal what the `generate` path's processor computes on the same
    prefix; with no statistics yet the factor is exactly 1."""
    from align_cli.losses.hapo import EntropyStats

    from align_cli.rl.temperature import AdaptiveTemperature

    stats = EntropyStats(quantile=0.5, scale=0.7, positive_max=1.3, negative_min=-2.0)
    temperature, tau = 0.9, 0.4
    for statistics in (None, stats):
        processor = AdaptiveTemperature(statistics, tau)
        sampling = Sampling(temperature, 1.0, seed=4, adaptive=processor.fast_sampling())
        out = fast_generate(model, PROMPTS, 3, 10, sampling, {5}, max_slots=5)
        for index, tokens in enumerate(out.tokens):
            prompt = PROMPTS[index // 3]
            factors, entropies, logps = _hapo_reference(model, prompt, tokens, temperature,
                                                        AdaptiveTemperature(statistics, tau))
            assert torch.allclose(torch.tensor(out.temperature_factors[index]), factors, atol=1e-5)
            assert torch.allclose(torch.tensor(out.entropies[index]), entropies, atol=1e-4)
            assert torch.allclose(torch.tensor(out.tempered_logps[index]), logps, atol=1e-4)
        if statistics is None:
            assert all(f == 1.0 for row in out.temperature_factors for f in row)
        else:
            assert any(abs(f - 1.0) > 1e-3 for row in out.temperature_factors for f in row)


def test_hapo_rollouts_take_the_fast_path_with_their_records(tiny_model_dir, tokenizer):
    from align_cli.losses.hapo import EntropyStats

    from align_cli.rl.rollout import generate_rollouts, score
    from align_cli.rl.temperature import AdaptiveTemperature

    policy = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 2?"}]} for a in range(2)]
    processor = AdaptiveTemperature(EntropyStats(0.5, 0.7, 1.3, -2.0), tau=0.3)
    rollouts = generate_rollouts(policy, tokenizer, rows, 3, max_new_tokens=8, temperature=0.8, top_p=1.0, seed=1,
                                 batch_size=2, logits_processor=processor, fast=True)
    assert rollouts.sampler_logps is not None  # the fast path ran
    assert [len(t) for t in rollouts.temperatures] == [len(c) for c in rollouts.completion_ids]
    assert [len(e) for e in rollouts.sampling_entropies] == [len(c) for c in rollouts.completion_ids]
    assert processor.positions == sum(len(c) for c in rollouts.completion_ids)
    # the trainer scores each token at the temperature it was drawn at, and gets the sampler's log-prob back
    trainer, _ = score(policy, rollouts, tokenizer.pad_token_id, fused=False, with_entropy=False, temperature=0.8)
    for row, values in enumerate(rollouts.sampler_logps):
        assert torch.allclose(torch.tensor(values), trainer[row, : len(values)], atol=1e-4)


def test_compiled_hapo_step_matches_eager_and_new_statistics_reuse_it(model):
    """HAPO's temperature inside the compiled step: the eager step's tokens and factors, and a later step's new
    statistics (the RL loop's next step) run the same compiled graph: they are a tensor, not constants."""
    from align_cli.losses.hapo import EntropyStats

    from align_cli.fast_generation import AdaptiveSampling

    compiled = fast_generation.Compile(backend="aot_eager")
    first = Sampling(1.0, 1.0, seed=2, adaptive=AdaptiveSampling(0.5, "paper", EntropyStats(0.4, 0.8, 1.5, -1.5)))
    eager = fast_generate(model, PROMPTS, 3, 12, first, {5}, max_slots=5, compile_step=False)
    out = fast_generate(model, PROMPTS, 3, 12, first, {5}, max_slots=5, compile_step=compiled)
    assert "compile_error" not in out.stats and out.tokens == eager.tokens
    assert max(abs(a - b) for x, y in zip(out.temperature_factors, eager.temperature_factors)
               for a, b in zip(x, y)) < 1e-5
    graphs = _dynamo_graphs()
    second = Sampling(1.0, 1.0, seed=2, adaptive=AdaptiveSampling(0.5, "paper", EntropyStats(0.1, 1.2, 0.9, -2.5)))
    again = fast_generate(model, PROMPTS, 3, 12, second, {5}, max_slots=5, compile_step=compiled)
    assert _dynamo_graphs() == graphs and again.temperature_factors != out.temperature_factors


def test_regionally_compiled_layers_run_eagerly_inside_the_fast_path(model):
    """A policy whose layers the trainer compiled (`training.compile`): the fast path decodes with their eager
    forward (it compiles its own step) and leaves their compiled forward in place for training."""
    from align_cli.compilation import compile_layers

    expected = fast_generate(model, PROMPTS, 2, 8, Sampling(0.0), {5})
    policy = LlamaForCausalLM(model.config).eval()
    policy.load_state_dict(model.state_dict())
    compiled = compile_layers(policy, backend="aot_eager")
    calls = [layer._compiled_call_impl for layer in compiled.layers]
    assert all(calls)
    assert fast_generate(policy, PROMPTS, 2, 8, Sampling(0.0), {5}).tokens == expected.tokens
    assert [layer._compiled_call_impl for layer in compiled.layers] == calls


def _partner(model, seed: int = 9):
    torch.manual_seed(seed)
    previous = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        previous.lm_head.weight.mul_(8.0)
    return previous


def test_apo_extrapolation_greedy_matches_generate_with_its_processor(model):
    """APO's sampler on the fast path (the previous model decoded in step, its keys and values in the same
    slots): greedy tokens equal `generate` with `ExtrapolatedLogits`, with refills (3 slots for 8 sequences)."""
    from transformers import LogitsProcessorList

    from align_cli.iterative.extrapolation import ExtrapolatedLogits, extrapolated_logits_factory

    previous = _partner(model)
    out = fast_generate(model, PROMPTS, 2, 12, Sampling(0.0), {5}, max_slots=3, extrapolation=(previous, 0.5))
    plain = fast_generate(model, PROMPTS, 2, 12, Sampling(0.0), {5}, max_slots=3)
    for index, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        processor = ExtrapolatedLogits(previous, 0.5, torch.ones_like(ids))
        reference = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=5, pad_token_id=0,
                                   logits_processor=LogitsProcessorList([processor]))[0, len(prompt):].tolist()
        expected = reference[: reference.index(5) + 1] if 5 in reference else reference
        assert out.tokens[2 * index] == expected and out.tokens[2 * index + 1] == expected
    assert out.tokens != plain.tokens  # the extrapolation changes what is sampled
    assert blocker(model, [extrapolated_logits_factory(previous, 0.5)]) is None
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    assert "key/value layout" in blocker(model, [extrapolated_logits_factory(other, 0.5)])


def test_apo_extrapolation_samples_follow_the_extrapolated_softmax(model):
    from align_cli.fast_generation import extrapolate

    previous, prompt, temperature, n = _partner(model), PROMPTS[1], 0.7, 6000
    out = fast_generate(model, [prompt], n, 1, Sampling(temperature, 1.0, seed=5), set(),
                        extrapolation=(previous, 1.0))
    with torch.no_grad():
        current = model(torch.tensor([prompt])).logits[:, -1].float()
        before = previous(torch.tensor([prompt])).logits[:, -1].float()
    exact = (extrapolate(current, before, 1.0)[0] / temperature).softmax(-1).double()
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=VOCAB).double()
    # sampling noise: E[TV] <= 0.5 * sqrt(support / n) ~ 0.05; the unextrapolated softmax is far off
    assert 0.5 * (counts / n - exact).abs().sum() < 0.06
    assert 0.5 * ((current[0] / temperature).softmax(-1).double() - exact).abs().sum() > 0.15


def test_compiled_apo_step_gives_the_eager_tokens(model):
    compiled = fast_generation.Compile(backend="aot_eager")
    previous, sampling = _partner(model), Sampling(1.0, 1.0, seed=8)
    eager = fast_generate(model, PROMPTS, 3, 12, sampling, {5}, max_slots=5, compile_step=False,
                          extrapolation=(previous, 0.5))
    out = fast_generate(model, PROMPTS, 3, 12, sampling, {5}, max_slots=5, compile_step=compiled,
                        extrapolation=(previous, 0.5))
    assert "compile_error" not in out.stats and out.stats["compiled"] >= 1
    assert out.tokens == eager.tokens and out.stopped == eager.stopped
