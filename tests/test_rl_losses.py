"""GRPO / DAPO / GSPO losses against hand computations in float64, and the token-mean normaliser under
gradient accumulation (docs/ALGORITHMS.md section 7)."""

import math

import pytest
import torch
from align_cli.losses import LOSSES, group_advantages, k3_kl
from align_cli.losses.rl import aggregate, clipped_surrogate, sequence_log_ratio

from align_cli.rl.update import normaliser_count

B, T = 5, 7


def rollout_tensors(seed=0, batch=B, width=T):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[0] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).double()
    old = -3 * torch.rand(batch, width, generator=generator, dtype=torch.float64)
    policy = old + 0.4 * (torch.rand(batch, width, generator=generator, dtype=torch.float64) - 0.5)
    ref = old + 0.3 * (torch.rand(batch, width, generator=generator, dtype=torch.float64) - 0.5)
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)
    return policy, old, ref, advantages, mask


def hand_token_loss(policy, old, advantage, eps_low, eps_high):
    ratio = math.exp(policy - old)
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    return -min(ratio * advantage, clipped * advantage)


@pytest.mark.parametrize("name, eps_low, eps_high, aggregation", [
    ("grpo", 0.2, 0.2, "seq-mean-token-mean"),
    ("dapo", 0.2, 0.28, "token-mean"),
])
def test_clipped_objective_matches_hand_computation(name, eps_low, eps_high, aggregation):
    policy, old, ref, advantages, mask = rollout_tensors(1)
    policy.requires_grad_()
    kl_beta = 0.05
    loss, metrics = LOSSES[name](policy, old, advantages, mask, ref_token_logps=ref, kl_beta=kl_beta)
    per_sequence = []
    for i in range(B):
        terms = []
        for t in range(int(mask[i].sum())):
            p, o, r = float(policy.detach()[i, t]), float(old[i, t]), float(ref[i, t])
            kl = math.exp(r - p) - (r - p) - 1
            terms.append(hand_token_loss(p, o, float(advantages[i]), eps_low, eps_high) + kl_beta * kl)
        per_sequence.append(terms)
    if aggregation == "token-mean":
        expected = sum(sum(s) for s in per_sequence) / sum(len(s) for s in per_sequence)
    else:
        expected = sum(sum(s) / len(s) for s in per_sequence) / B
    assert loss.shape == (B,)
    assert math.isclose(float(loss.detach().mean()), expected, rel_tol=1e-12)
    assert metrics["kl"] >= 0 and 0 <= metrics["clip_ratio/high"] <= 1
    loss.mean().backward()
    assert torch.all(policy.grad[mask == 0] == 0)


def test_clip_higher_bounds_and_masks():
    log_ratio = torch.log(torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 1.5], dtype=torch.float64))
    advantages = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    loss, low, high = clipped_surrogate(log_ratio, advantages, 0.2, 0.28)
    # r=0.5, A<0: clipped at 0.8 -> loss 0.8; r=1.5, A>0: clipped at 1.28 -> loss -1.28;
    # r=0.5 with A>0 and r=1.5 with A<0 are not clipped (the min keeps the unclipped, pessimistic term).
    torch.testing.assert_close(loss, torch.tensor([0.8, 0.9, -1.1, -1.28, -0.5, 1.5], dtype=torch.float64))
    assert low.tolist() == [True, False, False, False, False, False]
    assert high.tolist() == [False, False, False, True, False, False]


def test_gspo_sequence_ratio_and_gradient():
    policy, old, _, advantages, mask = rollout_tensors(2)
    eps_low, eps_high = 0.003, 0.004
    log_s = sequence_log_ratio(policy, old, mask)
    for i in range(B):
        n = int(mask[i].sum())
        assert math.isclose(float(log_s[i]), sum(float(policy[i, t] - old[i, t]) for t in range(n)) / n, rel_tol=1e-12)
    leaf = policy.clone().requires_grad_()
    loss, _ = LOSSES["gspo"](leaf, old, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    # GSPO's objective at sequence level: mean_i -min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log r)
    direct = policy.clone().requires_grad_()
    s = torch.exp(((direct - old) * mask).sum(1) / mask.sum(1))
    expected = -torch.minimum(s * advantages, s.clamp(1 - eps_low, 1 + eps_high) * advantages)
    torch.testing.assert_close(loss.mean(), expected.mean(), rtol=1e-12, atol=1e-14)
    loss.mean().backward()
    expected.mean().backward()
    torch.testing.assert_close(leaf.grad, direct.grad, rtol=1e-10, atol=1e-14)


def test_k3_and_group_advantages_by_hand():
    policy, ref = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0], dtype=torch.float64)
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(policy.tolist(), ref.tolist())]
    torch.testing.assert_close(k3_kl(policy, ref), torch.tensor(expected, dtype=torch.float64))
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    advantages = group_advantages(rewards)
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)  # Bessel-corrected, as TRL and verl
    torch.testing.assert_close(advantages[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (std + 1e-6))
    assert torch.all(advantages[1] == 0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "hapo"])
def test_normaliser_under_gradient_accumulation_equals_one_big_batch(name, aggregation):
    policy, old, _, advantages, mask = rollout_tensors(3, batch=8)
    loss_mask = mask * (torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) > 0.3)
    loss_mask[0, 0] = 1.0
    extra = {"token_entropy_signal": 2 * torch.rand(mask.shape, dtype=torch.float64) - 1} if name == "hapo" else {}

    def run(indices, normaliser):
        leaf = policy.clone().requires_grad_()
        per_sequence, _ = LOSSES[name](leaf[indices], old[indices], advantages[indices], mask[indices],
                                       loss_mask=loss_mask[indices], loss_normaliser=normaliser,
                                       aggregation=aggregation,
                                       **{k: v[indices] for k, v in extra.items()})
        per_sequence.mean().backward()
        return per_sequence.mean().detach(), leaf.grad

    whole = torch.arange(8)
    big_loss, big_grad = run(whole, None)
    global_count = normaliser_count(loss_mask, aggregation)
    total_loss, total_grad = 0.0, torch.zeros_like(policy)
    for part in (torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6, 7])):
        loss, grad = run(part, global_count)
        total_loss, total_grad = total_loss + loss, total_grad + grad
    torch.testing.assert_close(total_loss, big_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total_grad, big_grad, rtol=1e-10, atol=1e-14)
    # the micro-batch's own count (the default) would weigh tokens differently
    if aggregation == "token-mean":
        local, _ = run(torch.tensor([3, 4]), None)
        assert not torch.isclose(local, run(torch.tensor([3, 4]), global_count)[0])


def test_aggregate_modes_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert math.isclose(float(aggregate(token_loss, mask, "token-mean").mean()), 10 / 4)
    assert math.isclose(float(aggregate(token_loss, mask, "seq-mean-token-mean").mean()), (2 + 4) / 2)
    with pytest.raises(ValueError):
        aggregate(token_loss, mask, "sum")
