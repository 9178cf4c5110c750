"""HAPO's parts against hand computations from the formulas (ALGORITHMS.md section 9), in float64."""

import math

import pytest
import torch
from align_cli.losses import (
    LOSSES,
    EntropyStats,
    adaptive_clip_bounds,
    adaptive_temperature,
    entropy_signal,
    redistribute_advantages,
    token_level_group_advantages,
)
from align_cli.losses.hapo import normalise_entropy

from align_cli.rl.temperature import AdaptiveTemperature

ENTROPIES = [[0.05, 1.2, 0.3, 2.5, 0.0], [0.9, 0.01, 3.1, 0.4, 0.7]]
MASK = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def hand_signal(entropies, mask, rho, sign):
    values = [math.log(max(h, 1e-8)) for row, m in zip(entropies, mask) for h, v in zip(row, m) if v]
    ordered = sorted(values)
    quantile = ordered[round(rho * (len(values) - 1))]
    scale = math.sqrt(sum((v - quantile) ** 2 for v in values) / len(values))
    h = [(v - quantile) / scale for v in values]
    positive_max, negative_min = max(x for x in h if x > 0), min(x for x in h if x < 0)
    divisor = abs(negative_min) if sign == "paper" else negative_min
    return [x / positive_max if x > 0 else x / divisor for x in h], (quantile, scale, positive_max, negative_min)


@pytest.mark.parametrize("sign", ["paper", "released_code"])
def test_entropy_signal_matches_hand_computation(sign):
    entropy = torch.tensor(ENTROPIES, dtype=torch.float64)
    mask = torch.tensor(MASK)
    signal, stats = entropy_signal(entropy, mask, rho=0.8, sign=sign)
    expected, (quantile, scale, positive_max, negative_min) = hand_signal(ENTROPIES, MASK, 0.8, sign)
    torch.testing.assert_close(signal[mask.bool()], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert signal[0, 4] == 0  # outside the mask
    assert math.isclose(stats.quantile, quantile) and math.isclose(stats.scale, scale)
    assert math.isclose(stats.positive_max, positive_max) and math.isclose(stats.negative_min, negative_min)


def test_sign_option():
    entropy, mask = torch.tensor(ENTROPIES, dtype=torch.float64), torch.tensor(MASK)
    paper, _ = entropy_signal(entropy, mask, sign="paper")
    released, _ = entropy_signal(entropy, mask, sign="released_code")
    valid = mask.bool()
    # the paper: in [-1, 1], the lowest-entropy token at -1, the highest at +1
    assert paper[valid].min() == -1.0 and paper[valid].max() == 1.0
    assert (paper[valid][entropy[valid] < 0.3] < 0).all()
    # the released code: every value non-negative; it equals |paper|
    assert (released[valid] >= 0).all()
    torch.testing.assert_close(released, paper.abs())
    # so adaptive clipping never widens eps_low, and the low-entropy branch of redistribution never fires
    low, _ = adaptive_clip_bounds(released[valid], 0.2, 0.28)
    assert torch.all(low[released[valid] > 0] == 0.2)
    with pytest.raises(ValueError):
        entropy_signal(entropy, mask, sign="other")


def test_token_level_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    lengths = torch.tensor([2, 10, 4, 4])
    total = sum(lengths.tolist())
    mu = sum(n * r for n, r in zip(lengths.tolist(), rewards.tolist())) / total
    sigma = math.sqrt(sum(n * (r - mu) ** 2 for n, r in zip(lengths.tolist(), rewards.tolist())) / total)
    expected = [(r - mu) / (sigma + 1e-6) for r in rewards.tolist()]
    advantages = token_level_group_advantages(rewards, lengths)
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    assert abs(float((advantages * lengths).sum())) < 1e-9  # the token mean of A is zero
    assert torch.all(token_level_group_advantages(torch.ones(3, dtype=torch.float64), torch.tensor([1, 5, 9])) == 0)


def test_redistribution_by_hand():
    eps_low, eps_high, beta = 0.2, 0.28, 1.0  # band: 0.9 < r < 1.14
    signal = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.0], dtype=torch.float64)
    ratio = torch.tensor([1.0, 1.2, 1.0, 0.8, 1.0], dtype=torch.float64)
    advantages = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    got = redistribute_advantages(advantages, signal, ratio, eps_low, eps_high, beta)
    expected = []
    for a, h, r in zip(advantages.tolist(), signal.tolist(), ratio.tolist()):
        inside = 1 - eps_low / 2 < r < 1 + eps_high / 2
        scaled = (h > 0 and not inside) or (h <= 0 and inside)
        expected.append(a * (1 + beta * h) if scaled else a)
    assert expected == [2.0, 3.0, 1.0, 2.0, 2.0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_adaptive_clipping_by_hand():
    signal = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0], dtype=torch.float64)
    low, high = adaptive_clip_bounds(signal, 0.2, 0.28, a_c=1.0)
    expected_low = [0.2 * (1 - h) if h <= 0 else 0.2 for h in signal.tolist()]
    expected_high = [0.28 * (1 + h) if h > 0 else 0.28 for h in signal.tolist()]
    torch.testing.assert_close(low, torch.tensor(expected_low, dtype=torch.float64))
    torch.testing.assert_close(high, torch.tensor(expected_high, dtype=torch.float64))


@pytest.mark.parametrize("redistribution, adaptive_clipping", [(True, True), (True, False), (False, True), (False, False)])
def test_hapo_loss_by_hand(redistribution, adaptive_clipping):
    generator = torch.Generator().manual_seed(5)
    old = -2 * torch.rand(3, 4, generator=generator, dtype=torch.float64)
    policy = old + 0.6 * (torch.rand(3, 4, generator=generator, dtype=torch.float64) - 0.5)
    signal = 2 * torch.rand(3, 4, generator=generator, dtype=torch.float64) - 1
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    loss, _ = LOSSES["hapo"](policy, old, advantages, mask, signal, redistribution=redistribution,
                             adaptive_clipping=adaptive_clipping)
    total, count = 0.0, 0
    for i in range(3):
        for t in range(int(mask[i].sum())):
            h, r, a = float(signal[i, t]), math.exp(float(policy[i, t] - old[i, t])), float(advantages[i])
            eps_low, eps_high = 0.2, 0.28
            if adaptive_clipping:
                eps_low = 0.2 * (1 - h) if h <= 0 else 0.2
                eps_high = 0.28 * (1 + h) if h > 0 else 0.28
            if redistribution:
                inside = 1 - eps_low / 2 < r < 1 + eps_high / 2
                if (h > 0 and not inside) or (h <= 0 and inside):
                    a = a * (1 + h)
            total += -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            count += 1
    assert math.isclose(float(loss.mean()), total / count, rel_tol=1e-12)


def test_adaptive_temperature_formula_and_logits_processor():
    stats = EntropyStats(quantile=0.0, scale=2.0, positive_max=1.5, negative_min=-2.0)
    entropy = torch.tensor([math.exp(2.0), math.exp(-2.0), 1.0, math.exp(10.0)], dtype=torch.float64)
    h = [1.0, -1.0, 0.0, 5.0]  # (log H - 0) / 2
    expected_ht = [1.0 / 1.5, -1.0 / 2.0, 0.0, 1.0]  # the last clamped to 1
    torch.testing.assert_close(normalise_entropy(entropy, stats), torch.tensor(expected_ht, dtype=torch.float64))
    torch.testing.assert_close(adaptive_temperature(entropy, 0.7, 0.1, stats),
                               torch.tensor([0.7 * (1 + 0.1 * x) for x in expected_ht], dtype=torch.float64))
    assert h[2] == 0

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0], [8.0, 0.0, 0.0, 0.0]])
    processor = AdaptiveTemperature(stats, tau=0.1)
    out = processor(torch.zeros(2, 1, dtype=torch.long), scores.clone())
    probabilities = torch.softmax(scores.double(), -1)
    row_entropy = -(probabilities * probabilities.log()).sum(-1)
    factors = 1 + 0.1 * normalise_entropy(row_entropy, stats)
    torch.testing.assert_close(out.double(), scores.double() / factors[:, None], rtol=1e-6, atol=1e-6)
    assert math.isclose(processor.mean_factor, float(factors.mean()), rel_tol=1e-6)
    # a masked (-inf) logit leaves the entropy finite
    masked = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]])
    assert torch.isfinite(processor(torch.zeros(1, 1, dtype=torch.long), masked)[0, [0, 2, 3]]).all()
