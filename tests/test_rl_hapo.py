"""HAPO's parts against hand computations from the formulas (docs/ALGORITHMS.md section 9), in float64."""

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


def released_policy_loss(old, new, advantages, mask, entropy, eps_low, eps_high, clip_ratio_c, rho=0.8):
    """The released code's `compute_policy_loss` with HAPO's parts on (starriver030515/HAPO,
    verl/trainer/ppo/core_algos.py: compute_entropy_h, ada_clip, ada_advantage, dual-clip, token-mean), written
    out token by token in float64 from that file."""
    valid = [(i, t) for i, row in enumerate(mask) for t, m in enumerate(row) if m]
    log_h = {(i, t): math.log(max(entropy[i][t], 1e-8)) for i, t in valid}
    ordered = sorted(log_h.values())
    median = ordered[round(rho * (len(ordered) - 1))]
    std = math.sqrt(max(sum((v - median) ** 2 for v in log_h.values()) / len(valid), 1e-8))
    h = {key: (v - median) / std for key, v in log_h.items()}
    pos_max = max([x for x in h.values() if x > 0] + [0.0], default=0.0)
    neg_min = min([x for x in h.values() if x < 0] + [0.0], default=0.0)
    pos_max, neg_min = max(pos_max, 1e-8), min(neg_min, -1e-8)
    total = 0.0
    for i, t in valid:
        h_hat = h[i, t] / pos_max if h[i, t] > 0 else h[i, t] * (1.0 / neg_min)
        low = eps_low * (1 - h_hat) if h_hat <= 0 else eps_low  # ada_clip, clip_alpha 1
        high = eps_high * (1 + h_hat) if h_hat > 0 else eps_high
        ratio = math.exp(new[i][t] - old[i][t])
        a = advantages[i]
        inside = 1 - low / 2 < ratio < 1 + high / 2  # ada_advantage, adv_beta 1
        a_ent = a * (1 + h_hat)
        a = (a if inside else a_ent) if h_hat > 0 else (a_ent if inside else a)
        loss1 = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
        total += min(-a * clip_ratio_c, loss1) if a < 0 else loss1  # dual-clip on negative advantages
    return total / len(valid)


def test_released_preset_matches_the_released_code():
    """`hapo` with the released preset's values (eps 0.2 / 0.2, dual clip 10) on the signal of `entropy_signal`
    with `sign="released_code"` equals the released code's loss; ratios up to e^3 reach the dual clip."""
    generator = torch.Generator().manual_seed(3)
    entropies = torch.rand(3, 6, generator=generator, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    old = -torch.rand(3, 6, generator=generator, dtype=torch.float64) * 4
    new = (old + torch.tensor([[0.0, 0.05, -0.15, 3.0, 0.12, 0.0], [2.6, -0.3, 0.08, 0.0, -0.02, 0.3],
                               [-0.25, 0.15, 2.9, 0.0, 0.0, 0.0]], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.3, -0.8, -1.6], dtype=torch.float64)
    signal, _ = entropy_signal(entropies, mask, 0.8, "released_code")
    loss, metrics = LOSSES["hapo"](new, old, advantages, mask, signal, eps_low=0.2, eps_high=0.2, dual_clip=10.0)
    expected = released_policy_loss(old.tolist(), new.tolist(), advantages.tolist(), mask.tolist(), entropies.tolist(),
                                    0.2, 0.2, 10.0)
    assert math.isclose(float(loss.detach().mean()), expected, rel_tol=1e-12)
    assert float(metrics["clip_ratio/dual"]) > 0  # the dual clip did fire
    without, _ = LOSSES["hapo"](new, old, advantages, mask, signal, eps_low=0.2, eps_high=0.2)
    assert float(without.detach().mean()) > float(loss.detach().mean()) + 1e-3


def test_dual_clip_caps_negative_advantage_tokens():
    """-A*c caps the loss of a negative-advantage token whose ratio exceeds c (no gradient there); positive
    advantages and ratios below c are untouched."""
    log_ratio = torch.log(torch.tensor([[12.0, 2.0, 12.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(1, 3, dtype=torch.float64)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]], dtype=torch.float64)
    loss, _ = LOSSES["dapo"](log_ratio, old, advantages, torch.ones(1, 3), aggregation="token-mean")
    capped, metrics = LOSSES["hapo"](log_ratio, old, advantages, torch.ones(1, 3), torch.zeros(1, 3),
                                     eps_high=0.28, dual_clip=10.0)
    # per token: min(-A*c, max(-A*r, -A*clip(r))): 10 (capped from 12), 2, -1.28 (clipped at 1 + 0.28)
    assert math.isclose(float(capped.detach().mean()), (10.0 + 2.0 - 1.28) / 3, rel_tol=1e-12)
    assert math.isclose(float(loss.detach().mean()), (12.0 + 2.0 - 1.28) / 3, rel_tol=1e-12)
    (gradient,) = torch.autograd.grad(capped.sum(), log_ratio)
    assert gradient[0, 0] == 0 and gradient[0, 1] != 0
    assert math.isclose(float(metrics["clip_ratio/dual"]), 1 / 3, rel_tol=1e-12)


def test_presets_fill_what_the_recipe_leaves_out(tmp_path):
    from align_cli.recipe import load_recipe
    from align_cli.rl.trainer import loss_settings

    paper, _ = load_recipe("hapo")
    released, _ = load_recipe("hapo", ["method.rl.hapo.preset=released"])
    mixed, _ = load_recipe("hapo", ["method.rl.hapo.preset=released", "method.rl.hapo.tau=0.2",
                                    "method.losses.0.eps_high=0.28"])
    assert paper.method.rl.hapo.preset == "paper"  # the shipped recipe's default
    settings = paper.method.rl.hapo.settings
    assert (settings.entropy_sign, settings.tau, settings.signal_source, settings.score_temperature) == (
        "paper", 0.1, "rollout_step", "sampled")
    settings = released.method.rl.hapo.settings
    assert (settings.entropy_sign, settings.tau, settings.signal_source, settings.score_temperature) == (
        "released_code", 0.05, "micro_batch", "base")
    params = {name: loss_settings(recipe)[2] for name, recipe in
              (("paper", paper), ("released", released), ("mixed", mixed))}
    assert [params["paper"][k] for k in ("eps_low", "eps_high", "dual_clip")] == [0.2, 0.28, None]
    assert [params["released"][k] for k in ("eps_low", "eps_high", "dual_clip")] == [0.2, 0.2, 10.0]
    assert params["mixed"]["eps_high"] == 0.28 and mixed.method.rl.hapo.settings.tau == 0.2  # the recipe wins
    assert mixed.method.rl.hapo.settings.entropy_sign == "released_code"


def test_micro_batch_signal_comes_from_the_current_policy(tiny_model_dir):
    """`signal_source: micro_batch`: each micro-batch's ht is `entropy_signal` of the current policy's entropies
    over that micro-batch's completion tokens, not the step-level signal stored in the batch."""
    from transformers import AutoModelForCausalLM

    from align_cli.rl.rollout import Rollouts, completion_mask, score
    from align_cli.rl.update import TrainBatch, micro_batch_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    completions = [[11, 300, 25, 8, 64], [90, 2, 150], [40, 41, 42, 43]]
    rollouts = Rollouts([[5, 17, 42], [7, 3], [9]], completions, [""] * 3, torch.zeros(3, dtype=torch.bool),
                        torch.zeros(3, dtype=torch.long), [{}] * 3)
    mask = completion_mask(rollouts.lengths)
    old = -11.0 + 0.3 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    stale = torch.ones_like(mask)  # a step-level signal that must not be used
    advantages = torch.tensor([1.0, -0.5, -1.2])
    batch = TrainBatch(rollouts, advantages, mask, mask, old, None, stale, temperature=0.7,
                       micro_batch_signal=(0.8, "released_code"))
    params = {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0}
    indices = torch.tensor([0, 2])
    loss, _ = micro_batch_loss(model, batch, indices, LOSSES["hapo"], params, None, 0, True)
    part = rollouts.select(indices)
    with torch.no_grad():
        logps, entropy = score(model, part, 0, fused=False, with_entropy=True, temperature=0.7)
    part_mask = mask[indices][:, : logps.shape[1]]
    signal, _ = entropy_signal(entropy, part_mask, 0.8, "released_code")
    expected, _ = LOSSES["hapo"](logps, old[indices][:, : logps.shape[1]], advantages[indices], part_mask, signal,
                                 **params)
    assert math.isclose(float(loss.detach()), float(expected.mean()), rel_tol=1e-5)
    stale_loss, _ = LOSSES["hapo"](logps, old[indices][:, : logps.shape[1]], advantages[indices], part_mask,
                                   stale[indices][:, : logps.shape[1]], **params)
    assert not math.isclose(float(loss.detach()), float(stale_loss.mean()), rel_tol=1e-3)
