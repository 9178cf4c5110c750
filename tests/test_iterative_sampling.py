"""APO's sampling policies against hand computations: per-token extrapolated logits (both models with their
own KV caches inside `generate`, left-padded prompts) and extrapolated weights (tied embeddings once)."""

import pytest
import torch

from align_cli.data.render import render_prompts
from align_cli.engine import choose_engine
from align_cli.generation import SamplingSettings, generate
from align_cli.iterative.extrapolation import ExtrapolatedLogits, extrapolated_logits_factory, extrapolated_weights
from align_cli.iterative.sampling import Sampler, sample_responses

ALPHA = 0.4
PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}],
           [{"role": "user", "content": "What is 12 * 9? Reply with just the equation and its result, please."}]]


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tmp_path_factory, tokenizer):
    """pihat_{t-1} (the tiny model) and pihat_t (the same with perturbed weights), saved as directories."""
    from transformers import AutoModelForCausalLM

    previous = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    current = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in current.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("tiny-current")
    current.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return previous, current, directory


class Recording(ExtrapolatedLogits):
    """The processor under test, keeping what it returned at each step."""

    outputs: list

    def __call__(self, input_ids, scores):
        combined = super().__call__(input_ids, scores)
        self.outputs.append((input_ids.clone(), combined.clone()))
        return combined


@torch.no_grad()
def test_extrapolated_logits_match_full_forwards_of_both_models(two_models, tokenizer):
    previous, current, _ = two_models
    recorded = []

    def factory(encoded, num_samples):
        processor = Recording(previous, ALPHA, encoded["attention_mask"].repeat_interleave(num_samples, dim=0))
        processor.outputs = recorded
        return processor

    settings = SamplingSettings(max_new_tokens=5, temperature=0.0, batch_size=2)
    texts = generate(current, tokenizer, PROMPTS, settings, processor_factory=factory)
    assert len(recorded) == 5 and len(texts) == 2

    rendered = render_prompts(tokenizer, PROMPTS)
    for row, text in enumerate(rendered):  # each prompt alone: no padding, no cache, plain forwards
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        for step in range(5):
            expected = (1 + ALPHA) * current(input_ids=ids).logits[0, -1] - ALPHA * previous(input_ids=ids).logits[0, -1]
            got_ids, got = recorded[step]
            assert got_ids[row][-ids.shape[1]:].tolist() == ids[0].tolist()  # same prefix (left-padded there)
            torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-4)
            ids = torch.cat([ids, expected.argmax().view(1, 1)], dim=1)        # greedy on the hand computation
        generated = tokenizer.decode(ids[0, -5:], skip_special_tokens=True)
        assert texts[row][0] == generated


@torch.no_grad()
def test_extrapolated_logits_with_several_samples_per_prompt(two_models, tokenizer):
    previous, current, _ = two_models
    settings = SamplingSettings(max_new_tokens=4, temperature=0.7, top_p=0.9, num_samples=3, seed=1, batch_size=2)
    first = generate(current, tokenizer, PROMPTS, settings, processor_factory=extrapolated_logits_factory(previous, ALPHA))
    again = generate(current, tokenizer, PROMPTS, settings, processor_factory=extrapolated_logits_factory(previous, ALPHA))
    plain = generate(current, tokenizer, PROMPTS, settings)
    assert [len(samples) for samples in first] == [3, 3] and first == again  # seeded
    assert first != plain


def test_alpha_zero_logits_are_the_policy_logits(two_models, tokenizer):
    previous, current, _ = two_models
    settings = SamplingSettings(max_new_tokens=4, temperature=0.7, top_p=0.9, num_samples=2, seed=3, batch_size=2)
    assert (generate(current, tokenizer, PROMPTS, settings, processor_factory=extrapolated_logits_factory(previous, 0.0))
            == generate(current, tokenizer, PROMPTS, settings))


@torch.no_grad()
def test_extrapolated_weights(two_models, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    previous, current, directory = two_models
    result = extrapolated_weights(AutoModelForCausalLM.from_pretrained(directory), previous, ALPHA)
    expected_state = {name: (1 + ALPHA) * tensor - ALPHA * previous.state_dict()[name]
                      for name, tensor in current.state_dict().items()}
    for name, tensor in result.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name], rtol=1e-6, atol=1e-6, msg=name)
    assert result.get_output_embeddings().weight.data_ptr() == result.get_input_embeddings().weight.data_ptr()


def test_engine_choice_and_modes(two_models, tiny_model_dir, tokenizer):
    _, _, directory = two_models
    assert Sampler(str(directory), None, ALPHA, "extrapolated_logits").mode == "policy"   # first iteration
    assert Sampler(str(directory), str(tiny_model_dir), 0.0, "extrapolated_weights").mode == "policy"
    assert choose_engine("auto", needs_transformers=True) == "transformers"
    from align_cli.config import ModelConfig

    responses, info = sample_responses(
        Sampler(str(directory), str(tiny_model_dir), ALPHA, "extrapolated_weights"), tokenizer, PROMPTS,
        SamplingSettings(max_new_tokens=3, temperature=0.7, num_samples=2, seed=0), model_config=ModelConfig(),
        dtype=torch.float32, engine="transformers")
    assert info == {"engine": "transformers", "sample_from": "extrapolated_weights"}
    assert [len(r) for r in responses] == [2, 2]


@torch.no_grad()
def test_extrapolated_logits_sampler_on_the_fast_path(two_models, tiny_model_dir, tokenizer, monkeypatch):
    """APO's extrapolated-logits sampler through `sample_responses`: greedy answers on the fast path (forced on
    CPU; the previous model decoded in step with the current one) equal `generate`'s with `ExtrapolatedLogits`."""
    from align_cli import fast_generation
    from align_cli.config import ModelConfig

    _, _, directory = two_models
    sampler = Sampler(str(directory), str(tiny_model_dir), ALPHA, "extrapolated_logits")
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0, num_samples=1, seed=0, batch_size=2)
    calls = []
    original = fast_generation.fast_generate
    monkeypatch.setattr(fast_generation, "fast_generate", lambda *a, **k: calls.append(k) or original(*a, **k))
    answers = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("ALIGN_FAST_GENERATION", mode)
        answers[mode], info = sample_responses(sampler, tokenizer, PROMPTS, settings, model_config=ModelConfig(),
                                               dtype=torch.float32, engine="transformers")
        assert info["sample_from"] == "extrapolated_logits"
    assert len(calls) == 1 and calls[0]["extrapolation"][1] == ALPHA  # the fast path ran once, with the partner
    assert answers["1"] == answers["0"]
