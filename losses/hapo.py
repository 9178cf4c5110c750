"""HAPO, heterogeneous adaptive policy optimisation: DAPO with four token-level parts driven by entropy.

Liu et al. 2025, "From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's Nature"
(arXiv); code github.com/starriver030515/HAPO (verl/trainer/ppo/core_algos.py). docs/ALGORITHMS.md section 9. The parts, each usable alone (the paper's ablation switches them one at a time):

1. the normalised entropy signal `ht` in [-1, 1] (`entropy_signal`), low-entropy tokens negative;
2. adaptive temperature sampling from that signal (`adaptive_temperature`; the generation side is
   `align_cli.rl.temperature.AdaptiveTemperature`);
3. token-level group average advantages (`token_level_group_advantages`);
4. differential advantage redistribution (`redistribute_advantages`) and asymmetric adaptive clipping
   (`adaptive_clip_bounds`), both inside the `hapo` loss.

Sign convention (`sign`): `paper` (default) maps `h <= 0` to `h / |min(h)|`, so low-entropy tokens get
negative `ht`. `released_code` reproduces the released code, which divides by `min(h)` itself (a negative
number): every `ht` is then >= 0 and every low-entropy branch is dead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import register
from .common import upcast
from .ranges import NON_NEGATIVE
from .rl import CLIP_RANGES, inputs_used_by_rl_loss, policy_loss, token_advantages

SIGNS = ("paper", "released_code")


@dataclass(frozen=True)
class EntropyStats:
    """The batch statistics that normalise entropies: `h = (log H - quantile) / scale`, then `h` is divided
    by `positive_max` where positive and by `|negative_min|` (paper) or `negative_min` (released code)."""

    quantile: float
    scale: float
    positive_max: float
    negative_min: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _quantile_nearest(values: torch.Tensor, rho: float) -> torch.Tensor:
    # The released code's `torch_quantile(..., interpolation="nearest")`: the order statistic at
    # index round(rho * (n - 1)) (Python's round, ties to even).
    index = round(rho * (values.numel() - 1))
    return torch.kthvalue(values, index + 1).values


def entropy_statistics(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.8, eps: float = 1e-8) -> EntropyStats:
    """`EntropyStats` of the valid tokens (`mask`) of a batch of entropies.

    `log H` (H clamped at eps); `quantile = Q_rho(log H)` (nearest order statistic); `scale` is the root mean
    square of `log H - quantile` over valid tokens. docs/ALGORITHMS.md leaves the scale `s` unnamed; this is the
    released code's `std` (`compute_entropy_h`), a spread around the quantile rather than around the mean.
    """
    mask = mask.bool()
    log_entropy = torch.log(upcast(entropy).clamp_min(eps))[mask]
    if log_entropy.numel() == 0:
        return EntropyStats(0.0, 1.0, eps, -eps)
    quantile = _quantile_nearest(log_entropy, rho)
    centred = log_entropy - quantile
    scale = torch.sqrt((centred * centred).mean().clamp_min(eps))
    h = centred / scale
    positive = h[h > 0]
    negative = h[h < 0]
    positive_max = float(positive.max()) if positive.numel() else 0.0
    negative_min = float(negative.min()) if negative.numel() else 0.0
    return EntropyStats(float(quantile), float(scale), max(positive_max, eps), min(negative_min, -eps))


def normalise_entropy(entropy: torch.Tensor, stats: EntropyStats, sign: str = "paper", eps: float = 1e-8) -> torch.Tensor:
    """`ht` of each entropy under given statistics, clamped to [-1, 1] (values from another batch, as during
    generation with the previous step's statistics, can fall outside that batch's range)."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    h = (torch.log(upcast(entropy).clamp_min(eps)) - stats.quantile) / stats.scale
    negative_divisor = abs(stats.negative_min) if sign == "paper" else stats.negative_min
    return torch.where(h > 0, h / stats.positive_max, h / negative_divisor).clamp(-1.0, 1.0)


def entropy_signal(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.8, sign: str = "paper",
                   eps: float = 1e-8) -> tuple[torch.Tensor, EntropyStats]:
    """HAPO's normalised entropy signal of a batch: `h = (log H - Q_rho(log H)) / s`, then `ht = h / max(h)`
    for `h > 0` and `ht = h / |min(h)|` for `h <= 0` (`sign="paper"`) or `h / min(h)` (`"released_code"`).
    Returns `(ht [same shape, 0 where not mask], stats)`; the statistics drive the next step's sampling."""
    stats = entropy_statistics(entropy, mask, rho, eps)
    signal = normalise_entropy(entropy, stats, sign, eps) * mask.to(upcast(entropy).dtype)
    return signal, stats


def adaptive_temperature(entropy: torch.Tensor, base_temperature: float, tau: float, stats: EntropyStats,
                         sign: str = "paper") -> torch.Tensor:
    """Per-position sampling temperature `T = T_base * (1 + tau * ht)`, `ht` from the entropy of the
    untempered logits normalised with the previous step's statistics. tau: 0.1 in the paper, 0.05 in the code."""
    return base_temperature * (1.0 + tau * normalise_entropy(entropy, stats, sign))


def token_level_group_advantages(rewards: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Token-level group average advantage of one group of G rollouts, one value per rollout `[G]`:
    `mu = sum_i |o_i| R_i / sum_i |o_i|`, `sigma = sqrt(sum_i |o_i| (R_i - mu)^2 / sum_i |o_i|)`,
    `A_i = (R_i - mu) / (sigma + eps)`: the mean and std over every token of the group, so the token mean
    of the advantages is zero (what the token-mean loss averages)."""
    rewards = upcast(rewards)
    weights = lengths.to(rewards.dtype)
    total = weights.sum().clamp(min=eps)
    mu = (weights * rewards).sum() / total
    sigma = torch.sqrt((weights * (rewards - mu) ** 2).sum() / total)
    return (rewards - mu) / (sigma + eps)


def redistribute_advantages(advantages: torch.Tensor, signal: torch.Tensor, ratio: torch.Tensor, eps_low,
                            eps_high, beta_adv: float = 1.0) -> torch.Tensor:
    """Differential advantage redistribution: with the band `1 - eps_low/2 < r < 1 + eps_high/2`,
    `A' = A * (1 + beta_adv * ht)` where (ht > 0 and r outside the band) or (ht <= 0 and r inside it),
    else `A`. High-entropy tokens are amplified once they have moved, low-entropy ones damped while they have not."""
    inside = (ratio > 1.0 - eps_low / 2.0) & (ratio < 1.0 + eps_high / 2.0)
    scaled = advantages * (1.0 + beta_adv * signal)
    return torch.where(signal > 0, torch.where(inside, advantages, scaled), torch.where(inside, scaled, advantages))


def adaptive_clip_bounds(signal: torch.Tensor, eps_low: float, eps_high: float, a_c: float = 1.0):
    """Asymmetric adaptive clipping, per token: `eps_low' = eps_low * (1 - a_c * ht)` where ht <= 0 (else
    eps_low), `eps_high' = eps_high * (1 + a_c * ht)` where ht > 0 (else eps_high)."""
    low = torch.where(signal <= 0, eps_low * (1.0 - a_c * signal), torch.full_like(signal, eps_low))
    high = torch.where(signal > 0, eps_high * (1.0 + a_c * signal), torch.full_like(signal, eps_high))
    return low, high


@register("hapo", **CLIP_RANGES, beta_adv=NON_NEGATIVE.with_meaning("advantage redistribution strength"),
          a_c=NON_NEGATIVE.with_meaning("adaptive clipping strength"))
def hapo(policy_token_logps, old_token_logps, advantages, completion_mask, token_entropy_signal, loss_mask=None,
         ref_token_logps=None, loss_normaliser=None, *, eps_low: float = 0.2, eps_high: float = 0.28,
         kl_beta: float = 0.0, aggregation: str = "token-mean", redistribution: bool = True, beta_adv: float = 1.0,
         adaptive_clipping: bool = True, a_c: float = 1.0, dual_clip: float | None = None):
    """HAPO's loss: DAPO's clipped token-mean objective where each token's clip range comes from
    `adaptive_clip_bounds` (if `adaptive_clipping`) and its advantage from `redistribute_advantages` (if
    `redistribution`), both driven by `token_entropy_signal` (`ht`, from `entropy_signal`).

    Liu et al. 2025, "From Uniform to Heterogeneous" (HAPO), section 3. As in the released code, the
    redistribution band uses the adapted clip range when both parts are on. Paper defaults: eps_low 0.2,
    eps_high 0.28, beta_adv 1, a_c 1, no dual clip. The released code (`method.rl.hapo.preset: released`)
    uses eps_low = eps_high = 0.2 and dual-clip PPO with c = 10 (`dual_clip`, verl's `clip_ratio_c` as set in
    every released recipe) on the redistributed advantages.
    """
    policy = upcast(policy_token_logps)
    log_ratio = (policy - upcast(old_token_logps)) * completion_mask.to(policy.dtype)
    token_advantage = token_advantages(advantages, policy)
    signal = token_entropy_signal.to(policy.dtype)
    low, high = adaptive_clip_bounds(signal, eps_low, eps_high, a_c) if adaptive_clipping else (eps_low, eps_high)
    if redistribution:
        token_advantage = redistribute_advantages(token_advantage, signal, torch.exp(log_ratio.detach()), low, high,
                                                  beta_adv)
    return policy_loss(log_ratio, token_advantage, low, high, policy, completion_mask, loss_mask, ref_token_logps,
                       loss_normaliser, kl_beta, aggregation, dual_clip)


hapo.uses = inputs_used_by_rl_loss
