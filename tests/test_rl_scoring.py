"""Online RL scores completions under the distribution they were sampled from, softmax(z / T): the reference is
float64 `log_softmax(logits / T)` and its entropy from the tiny model's own full forward."""

import pytest
import torch
from align_cli.losses import LOSSES
from align_cli.losses.hapo import normalise_entropy
from transformers import AutoModelForCausalLM

from align_cli.rl.rollout import Rollouts, completion_mask, generate_rollouts, score, score_in_chunks
from align_cli.rl.temperature import AdaptiveTemperature, sampling_statistics
from align_cli.rl.update import TrainBatch, micro_batch_loss

PROMPTS = [[5, 17, 42, 9], [7, 3]]
COMPLETIONS = [[11, 300, 25, 8, 64], [90, 2, 150]]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_model64(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def rollouts_of(prompts, completions, temperatures=None):
    n = len(completions)
    return Rollouts(prompts, completions, [""] * n, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                    [{}] * n, temperatures)


def reference_scores(model64, prompt, completion, temperatures):
    """float64 log-prob of each completion token and entropy under softmax(logits / T_t), one row at a time."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model64(ids).logits[0, len(prompt) - 1: -1].double()  # the positions predicting the completion
    log_probs = torch.log_softmax(logits / torch.as_tensor(temperatures, dtype=torch.float64)[:, None], dim=-1)
    token = log_probs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    return token, -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("fused", [True, False])
def test_scores_are_of_the_tempered_distribution(tiny_model, tiny_model64, fused):
    rollouts = rollouts_of(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        logps, entropy = score(tiny_model, rollouts, 0, fused=fused, with_entropy=True, temperature=0.7)
        untempered, _ = score(tiny_model, rollouts, 0, fused=fused, with_entropy=True, temperature=1.0)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        expected_logps, expected_entropy = reference_scores(tiny_model64, prompt, completion, [0.7] * len(completion))
        n = len(completion)
        torch.testing.assert_close(logps[row, :n].double(), expected_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[row, :n].double(), expected_entropy, rtol=1e-5, atol=1e-5)
        assert (logps[row, n:] == 0).all()
    assert (logps - untempered).abs().max() > 1e-2  # T = 0.7 is not T = 1


@pytest.mark.parametrize("fused", [True, False])
def test_each_token_scored_under_its_recorded_temperature(tiny_model, tiny_model64, fused):
    temperatures = [[0.63, 0.7, 0.77, 0.7, 0.65], [0.75, 0.66, 0.7]]
    rollouts = rollouts_of(PROMPTS, COMPLETIONS, temperatures)
    with torch.no_grad():
        logps, entropy = score(tiny_model, rollouts, 0, fused=fused, with_entropy=True, temperature=0.7)
        base, _ = score(tiny_model, rollouts, 0, fused=fused, with_entropy=False, temperature=0.7,
                        per_token_temperature=False)
        plain, _ = score(tiny_model, rollouts_of(PROMPTS, COMPLETIONS), 0, fused=fused, with_entropy=False,
                         temperature=0.7)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        expected_logps, expected_entropy = reference_scores(tiny_model64, prompt, completion, temperatures[row])
        n = len(completion)
        torch.testing.assert_close(logps[row, :n].double(), expected_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[row, :n].double(), expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, plain)  # per_token_temperature=False: rl.temperature for every token


def test_adaptive_temperature_records_what_it_sampled_at(tiny_model, tiny_model64, tokenizer):
    """The rollouts' per-token temperatures are T_base * (1 + tau * ht) of the untempered entropy at each
    completion position, recomputed here from a float64 full forward; the recorded entropies are that entropy."""
    rows = [{"prompt": "What is 2 + 3?"}, {"prompt": "Say hi."}]

    def sample(processor, seed):
        return generate_rollouts(tiny_model, tokenizer, rows, 2, max_new_tokens=6, temperature=0.7, top_p=1.0,
                                 seed=seed, batch_size=2, logits_processor=processor)

    # step 1: no statistics yet; step 2 normalises with step 1's (the trainer's order)
    stats = sampling_statistics(sample(AdaptiveTemperature(None, tau=0.1), 0).sampling_entropies, 0.8)
    rollouts = sample(AdaptiveTemperature(stats, tau=0.1), 1)
    assert [len(t) for t in rollouts.temperatures] == [len(c) for c in rollouts.completion_ids]
    factors = []
    for prompt, completion, recorded, entropies in zip(rollouts.prompt_ids, rollouts.completion_ids,
                                                       rollouts.temperatures, rollouts.sampling_entropies):
        _, untempered_entropy = reference_scores(tiny_model64, prompt, completion, [1.0] * len(completion))
        entropies = torch.tensor(entropies, dtype=torch.float64)
        torch.testing.assert_close(entropies, untempered_entropy, rtol=1e-5, atol=1e-5)
        # (the random model's entropies differ by ~1e-3 nats, which the statistics stretch over [-1, 1]: the factor
        # is checked against the recorded entropy, itself checked against the float64 one just above)
        factor = 1 + 0.1 * normalise_entropy(entropies.float(), stats)  # in float32, as the processor computes
        torch.testing.assert_close(torch.tensor(recorded), 0.7 * factor, rtol=1e-6, atol=1e-7)
        factors += factor.tolist()
    assert max(factors) - min(factors) > 1e-3  # the temperatures do vary by token
    selected = rollouts.select([2, 0])
    assert selected.temperatures == [rollouts.temperatures[2], rollouts.temperatures[0]]
    joined = Rollouts.concatenate([rollouts, selected])
    assert joined.sampling_entropies == rollouts.sampling_entropies + selected.sampling_entropies
    # next step's statistics: of exactly these untempered entropies
    every = torch.tensor([e for row in rollouts.sampling_entropies for e in row], dtype=torch.float64)
    expected = sampling_statistics(rollouts.sampling_entropies, 0.8)
    log_h = every.log().sort().values
    assert expected.quantile == pytest.approx(float(log_h[round(0.8 * (len(log_h) - 1))]))
    # with no statistics (step 1) the processor leaves the distribution alone and still records
    first = AdaptiveTemperature(None, tau=0.1)
    scores = torch.randn(3, 11)
    torch.testing.assert_close(first(torch.zeros(3, 1, dtype=torch.long), scores.clone()), scores)
    recorded_factors, _ = first.take_records()
    assert recorded_factors.shape == (3, 1) and (recorded_factors == 1).all()


def test_update_scores_like_pi_old(tiny_model_dir):
    """pi_old's log-probs (score_in_chunks at T) and the update's (micro_batch_loss at TrainBatch.temperature) are
    of the same distribution: before any optimiser step the ratio is exactly 1, with per-token temperatures too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for temperatures in (None, [[0.63, 0.7, 0.77, 0.7, 0.65], [0.75, 0.66, 0.7]]):
        rollouts = rollouts_of(PROMPTS, COMPLETIONS, temperatures)
        old, _ = score_in_chunks(model, rollouts, 0, 1, fused=True, with_entropy=False, temperature=0.7)
        mask = completion_mask(rollouts.lengths)
        batch = TrainBatch(rollouts, torch.tensor([1.0, -1.0]), mask, mask, old, None, None, temperature=0.7)
        _, metrics = micro_batch_loss(model, batch, torch.arange(2), LOSSES["grpo"], {}, None, 0, True)
        assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-6)
        untempered, _ = score_in_chunks(model, rollouts_of(PROMPTS, COMPLETIONS), 0, 1, fused=True, with_entropy=False,
                                        temperature=1.0)
        assert ((untempered - old) * mask).abs().max() > 1e-2  # so a T = 1 update would not have ratio 1
