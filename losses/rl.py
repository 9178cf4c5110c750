"""Online RL policy losses: GRPO, DAPO and GSPO clipped objectives, the k3 KL estimator, group advantages.

docs/ALGORITHMS.md section 7. Every token-level loss takes padded per-token tensors `[B, T]` (one row per
completion) and masks:

- `policy_token_logps`: log-probs of the completion tokens under the policy being trained (with grad);
- `old_token_logps`: the same under `pi_old`, the policy that sampled the rollouts (no grad);
- `advantages`: `[B]` (one value per completion, spread over its tokens) or `[B, T]`;
- `completion_mask`: 1 on the completion's tokens (GSPO's sequence ratio averages over these);
- `loss_mask` (default `completion_mask`): 1 on the tokens that get gradient. The trainer clears it on
  truncated completions (DAPO overlong filtering) and on tokens D^3S leaves out;
- `ref_token_logps` (optional): the reference policy, for the k3 KL penalty;
- `loss_normaliser` (optional): the aggregation's denominator; see `aggregate`.

Each returns `(loss_per_sequence [B], metrics)` whose batch mean is the micro-batch's share of the
aggregated loss (the registry contract), so the trainer treats every loss alike.
"""

from __future__ import annotations

import torch

from . import register
from .common import upcast
from .ranges import NON_NEGATIVE, OneOf, Range

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
# The clip range [1 - eps_low, 1 + eps_high] must contain the ratio 1 and keep its lower end above 0.
CLIP_RANGES = dict(eps_low=Range(0.0, 1.0, high_open=True, meaning="lower clip, ratio >= 1 - eps_low"),
                   eps_high=NON_NEGATIVE.with_meaning("upper clip, ratio <= 1 + eps_high"),
                   kl_beta=NON_NEGATIVE.with_meaning("weight of the KL penalty"), aggregation=OneOf(AGGREGATIONS))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages `A_i = (R_i - mean(R)) / (std(R) + eps)` within each group (row) of `[P, G]`.

    `std` is the sample standard deviation (Bessel-corrected), as TRL's GRPOTrainer and verl's
    `compute_grpo_outcome_advantage` compute it; a group with equal rewards gets advantage 0.
    Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, section 4.1.2.
    """
    rewards = upcast(rewards)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages needs rewards [groups, G >= 2], got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): `exp(ref - pi) - (ref - pi) - 1` (>= 0, unbiased).

    Schulman 2020, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html); GRPO's KL term.
    The exponent is clamped at 20 so that a token the reference finds far likelier cannot overflow.
    """
    delta = (upcast(ref_token_logps) - upcast(policy_token_logps)).clamp(max=20.0)
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low, eps_high):
    """Per-token PPO loss `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)` with `r = exp(log_ratio)`.

    `eps_low`/`eps_high` are floats or tensors broadcastable to `log_ratio` (HAPO's per-token bounds).
    Returns `(loss, clipped_low, clipped_high)`: the boolean masks mark tokens where the clipped branch is
    the one taken (`r < 1-eps_low` with `A < 0`, `r > 1+eps_high` with `A > 0`), so they get no gradient.
    """
    ratio = torch.exp(log_ratio)
    lower = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype, device=ratio.device)
    upper = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype, device=ratio.device)
    clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    detached = ratio.detach()
    return loss, (detached < lower) & (advantages < 0), (detached > upper) & (advantages > 0)


def aggregate(token_loss: torch.Tensor, loss_mask: torch.Tensor, aggregation: str,
              loss_normaliser: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence values `[B]` whose mean over the micro-batch is its share of the aggregated loss.

    - `token-mean` (DAPO): `sum over all loss tokens / N`. `N` defaults to this micro-batch's loss-token
      count. When one optimiser step spans several micro-batches (gradient accumulation) or processes, pass
      the step's total loss-token count as `loss_normaliser`: the summed micro-batch losses are then
      exactly the token mean of the whole step, whatever the split.
    - `seq-mean-token-mean` (GRPO): the mean over sequences of each sequence's token mean. `N` defaults to
      the number of sequences with at least one loss token; pass the step's total for the same reason.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = loss_mask.to(token_loss.dtype)
    per_sequence = (token_loss * mask).sum(dim=-1)
    tokens = mask.sum(dim=-1)
    if aggregation == "seq-mean-token-mean":
        per_sequence = per_sequence / tokens.clamp(min=1.0)
        count = (tokens > 0).sum()
    else:
        count = tokens.sum()
    normaliser = count if loss_normaliser is None else torch.as_tensor(loss_normaliser, device=token_loss.device)
    return per_sequence * (token_loss.shape[0] / torch.clamp(normaliser.to(token_loss.dtype), min=1.0))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[B]` advantages spread over the tokens of each row, or `[B, T]` ones as they are, in `like`'s dtype."""
    advantages = advantages.to(like.dtype)
    return advantages[:, None].expand_as(like) if advantages.dim() == 1 else advantages


def dual_clipped(token_loss: torch.Tensor, advantages: torch.Tensor, dual_clip: float):
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729; verl's `clip_ratio_c`): where `A < 0` the per-token loss
    `max(-r*A, -clip(r)*A)` is capped at `-c*A`, so a ratio far above `1 + eps_high` on a bad token stops
    growing the loss (and gets no gradient). Returns `(loss, capped)`, `capped` marking the tokens cut."""
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    cap = -advantages * dual_clip
    capped = (advantages < 0) & (token_loss.detach() > cap.detach())
    return torch.where(capped, cap, token_loss), capped


def policy_loss(log_ratio, advantages, eps_low, eps_high, policy_token_logps, completion_mask, loss_mask,
                ref_token_logps, loss_normaliser, kl_beta: float, aggregation: str, dual_clip: float | None = None):
    """The clipped objective (dual-clipped when `dual_clip` is set) plus `kl_beta * k3`, aggregated; shared by
    `grpo`, `dapo`, `gspo` and `hapo`."""
    loss_mask = completion_mask if loss_mask is None else loss_mask
    token_loss, clipped_low, clipped_high = clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
    metrics = {
        "clip_ratio/low": _masked_mean(clipped_low.to(token_loss.dtype), loss_mask).detach(),
        "clip_ratio/high": _masked_mean(clipped_high.to(token_loss.dtype), loss_mask).detach(),
        "ratio": _masked_mean(torch.exp(log_ratio.detach()), loss_mask),
    }
    if dual_clip is not None:
        token_loss, capped = dual_clipped(token_loss, advantages, dual_clip)
        metrics["clip_ratio/dual"] = _masked_mean(capped.to(token_loss.dtype), loss_mask).detach()
    if kl_beta:
        if ref_token_logps is None:
            raise ValueError("kl_beta > 0 needs ref_token_logps")
        kl = k3_kl(policy_token_logps, ref_token_logps)
        token_loss = token_loss + kl_beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), loss_mask)
    return aggregate(token_loss, loss_mask, aggregation, loss_normaliser), metrics


def _token_ratio_loss(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask,
                      ref_token_logps, loss_normaliser, eps_low, eps_high, kl_beta, aggregation):
    policy = upcast(policy_token_logps)
    log_ratio = (policy - upcast(old_token_logps)) * completion_mask.to(policy.dtype)
    return policy_loss(log_ratio, token_advantages(advantages, policy), eps_low, eps_high, policy,
                       completion_mask, loss_mask, ref_token_logps, loss_normaliser, kl_beta, aggregation)


@register("grpo", **CLIP_RANGES)
def grpo(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask=None,
         ref_token_logps=None, loss_normaliser=None, *, eps_low: float = 0.2, eps_high: float = 0.2,
         kl_beta: float = 0.0, aggregation: str = "seq-mean-token-mean"):
    """GRPO: per token `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + kl_beta * k3`, `r = pi/pi_old`,
    aggregated `seq-mean-token-mean` (each completion's token mean, then the mean over completions).

    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300, eq. 3 (eps 0.2 both sides). The KL is the k3 estimator against the reference.
    """
    return _token_ratio_loss(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask,
                             ref_token_logps, loss_normaliser, eps_low, eps_high, kl_beta, aggregation)


@register("dapo", **CLIP_RANGES)
def dapo(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask=None,
         ref_token_logps=None, loss_normaliser=None, *, eps_low: float = 0.2, eps_high: float = 0.28,
         kl_beta: float = 0.0, aggregation: str = "token-mean"):
    """DAPO: the GRPO objective with clip-higher (eps_low 0.2, eps_high 0.28) and the token-level
    (`token-mean`) loss, no KL by default.

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476,
    eq. 8. Dynamic sampling, overlong shaping and overlong filtering live in the trainer (`align_cli.rl`).
    """
    return _token_ratio_loss(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask,
                             ref_token_logps, loss_normaliser, eps_low, eps_high, kl_beta, aggregation)


def sequence_log_ratio(policy_token_logps, old_token_logps, completion_mask) -> torch.Tensor:
    """GSPO's `log s_i = mean over the completion's tokens of log(pi/pi_old)`, shape `[B]`."""
    mask = completion_mask.to(upcast(policy_token_logps).dtype)
    difference = (upcast(policy_token_logps) - upcast(old_token_logps)) * mask
    return difference.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


@register("gspo", **CLIP_RANGES)
def gspo(policy_token_logps, old_token_logps, advantages, completion_mask, loss_mask=None,
         ref_token_logps=None, loss_normaliser=None, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
         kl_beta: float = 0.0, aggregation: str = "seq-mean-token-mean"):
    """GSPO: sequence ratio `s_i = exp(mean_t log(pi(o_t)/pi_old(o_t)))`, loss
    `-min(s_i*A_i, clip(s_i, 1-eps_low, 1+eps_high)*A_i)` per completion.

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, eq. 5-7 (eps 3e-4 / 4e-4).
    Written in the paper's GSPO-token form, `s_i,t = sg[s_i] * pi(o_t) / sg[pi(o_t)]`: its value is `s_i` on
    every token (so clipping is decided per sequence), and with `seq-mean-token-mean` aggregation its
    gradient is exactly GSPO's. That form lets `loss_mask` drop tokens (D^3S) while `s_i` still averages
    over the whole completion (`completion_mask`).
    """
    policy = upcast(policy_token_logps)
    log_s = sequence_log_ratio(policy, old_token_logps, completion_mask)
    log_ratio = log_s.detach()[:, None] + policy - policy.detach()
    return policy_loss(log_ratio, token_advantages(advantages, policy), eps_low, eps_high, policy,
                       completion_mask, loss_mask, ref_token_logps, loss_normaliser, kl_beta, aggregation)


def inputs_used_by_rl_loss(params: dict) -> set[str]:
    """The optional inputs an RL loss uses (`uses`, see losses.used_inputs): the loss mask and normaliser
    always, the reference's log-probs only for a KL term (`kl_beta > 0`), so the loop loads no reference
    otherwise."""
    return {"loss_mask", "loss_normaliser"} | ({"ref_token_logps"} if params.get("kl_beta", 0.0) > 0 else set())


for _rl_loss in (grpo, dapo, gspo):
    _rl_loss.uses = inputs_used_by_rl_loss
