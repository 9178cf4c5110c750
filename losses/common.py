"""Helpers every loss module shares: dtype promotion, log-ratios, the token-mean NLL, logged metrics."""

from __future__ import annotations

import torch


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in at least float32.

    Preference losses are built from small differences of large summed log-probs, which bf16/fp16 cannot
    resolve; float64 is kept so that `torch.autograd.gradcheck` can check the losses exactly.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def token_counts(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Completion lengths as floats of `like`'s dtype, at least 1 so that an empty completion divides."""
    return lengths.to(like.dtype).clamp(min=1.0)


def log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> tuple[torch.Tensor, torch.Tensor]:
    """`h(y_w), h(y_l)` with `h(y) = logp_pi(y|x) - logp_ref(y|x)`, in at least float32."""
    return upcast(policy_chosen) - upcast(ref_chosen), upcast(policy_rejected) - upcast(ref_rejected)


def spread_token_mean_nll(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-example values whose batch mean is the token-mean NLL of the batch, `-sum(logps) / sum(lengths)`.

    Every token of the batch weighs the same (TRL's `sft` term, TPO's NLL), yet the result has shape `[B]`
    like every other loss, so the trainer can weight and average it the same way. Each example's share is its
    own summed NLL scaled by `B / total_tokens`.
    """
    logps = upcast(logps)
    total_tokens = lengths.to(logps.dtype).sum().clamp(min=1.0)
    return -logps * (logps.shape[0] / total_tokens)


@torch.no_grad()
def preference_metrics(
    beta: float,
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL-named metrics of a pairwise loss, as detached scalar tensors.

    `chosen_scores`/`rejected_scores` are the implicit rewards before `beta` (the log-ratios `h` for losses
    with a reference, the policy log-probs for reference-free ones); accuracy is the fraction with `D > 0`.
    """
    chosen_rewards = beta * chosen_scores.detach()
    rejected_rewards = beta * rejected_scores.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_scores.detach() > rejected_scores.detach())
        .to(chosen_rewards.dtype)
        .mean(),
        "logps/chosen": upcast(policy_chosen.detach()).mean(),
        "logps/rejected": upcast(policy_rejected.detach()).mean(),
    }
