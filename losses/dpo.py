"""DPO family: pairwise losses of the margin `D = h(y_w) - h(y_l)`, `h(y) = logp_pi(y|x) - logp_ref(y|x)`.

All inputs are per-sequence sums of completion-token log-probs, shape `[B]`; every loss is computed in at
least float32 and returns `(loss_per_example [B], metrics)`. docs/ALGORITHMS.md section 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from .common import log_ratios, preference_metrics, spread_token_mean_nll, token_counts, upcast
from .ranges import BELOW_ONE_HALF, BETA, POSITIVE, OneOf, require_in_range


@register("dpo", beta=BETA)
def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1):
    """DPO, sigmoid loss: `-logsig(beta * D)`.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    arXiv:2305.18290, eq. 7. TRL `loss_type="sigmoid"`.
    """
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -F.logsigmoid(beta * (chosen - rejected))
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


@register("cdpo", beta=BETA,
          label_smoothing=BELOW_ONE_HALF.with_meaning("probability the label is wrong"))
def cdpo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
):
    """Conservative DPO (label smoothing eps): `-(1-eps) * logsig(beta*D) - eps * logsig(-beta*D)`.

    The cross-entropy against a label that is right with probability `1 - eps`; its minimum sits at a finite
    margin, so the log-ratios stop growing. Mitchell 2023, "A note on DPO with noisy preferences &
    relationship to IPO" (https://ericmitchell.ai/cdpo.pdf). Earlier TRL releases computed this as
    `loss_type="sigmoid"` with `label_smoothing`; TRL 1.16's `sigmoid` ignores `label_smoothing`.
    """
    require_in_range("cdpo", cdpo.ranges, label_smoothing=label_smoothing)
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen - rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


@register("rdpo", beta=BETA,
          label_smoothing=BELOW_ONE_HALF.with_meaning("label flip rate"))
def rdpo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
):
    """Robust DPO, labels flipped with probability eps in [0, 0.5):
    `[-(1-eps) * logsig(beta*D) + eps * logsig(-beta*D)] / (1 - 2*eps)`.

    The flipped-label term enters with a plus sign (cDPO: minus), which makes this an unbiased estimate of the
    clean-label DPO loss under random flips. Chowdhury et al. 2024, "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback", arXiv:2403.00409. TRL `loss_type="robust"`.
    """
    require_in_range("rdpo", rdpo.ranges, label_smoothing=label_smoothing)
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen - rejected)
    loss = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


@register("ipo", beta=POSITIVE.with_meaning("the target margin is 1/(2*beta)"))
def ipo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    chosen_lengths,
    rejected_lengths,
    *,
    beta: float = 0.1,
):
    """IPO: `(Dbar - 1/(2*beta))^2` with length-normalised log-ratios `Dbar = h(y_w)/|y_w| - h(y_l)/|y_l|`.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, eq. 17 (beta is the paper's tau). The paper writes sequence log-ratios; like TRL
    (`loss_type="ipo"`, confirmed with the IPO authors per TRL's comment) we divide by the completion token
    counts so that beta does not depend on completion length. Logged rewards stay `beta * h` (unnormalised).
    """
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    normalised_margin = chosen / token_counts(chosen_lengths, chosen) - rejected / token_counts(
        rejected_lengths, rejected
    )
    loss = (normalised_margin - 1 / (2 * beta)) ** 2
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


@register("hinge", beta=BETA)
def hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1):
    """Hinge loss on the log-ratio margin: `relu(1 - beta * D)`.

    SLiC's calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425) applied to log-ratios instead of raw log-probs, as TRL `loss_type="hinge"` does.
    """
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = torch.relu(1 - beta * (chosen - rejected))
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


# These see the reference only through the margin `ref_chosen - ref_rejected` of one prompt, so a per-prompt
# shift of the reference (APO's unnormalised anchor) leaves them unchanged (`reference_margin_only`).
for _margin_loss in (dpo, cdpo, rdpo, hinge):
    _margin_loss.reference_margin_only = True

SFT_NORMALIZATIONS = ("batch_tokens", "per_sequence")


@register("sft", normalize=OneOf(SFT_NORMALIZATIONS))
def sft(policy_chosen, chosen_lengths, *, normalize: str = "batch_tokens"):
    """NLL of the chosen completions, added with a weight to DPO as RPO: Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv:2404.19733.

    - `normalize="batch_tokens"` (default): the token mean over the batch, batch mean =
      `-sum_i logp(y_w_i|x_i) / sum_i |y_w_i|`. Each example's value is its summed NLL times
      `B / total_tokens`, so every token of the batch weighs the same, as in TRL's `loss_type="sft"`; the token
      count is that of this batch (one micro-batch, one rank), like TRL.
    - `normalize="per_sequence"`: the RPO paper's NLL term, `-log M(c, y|x) / (|c| + |y|)` for a chain of
      thought c and answer y: each example's NLL divided by its own length, `-logp(y_w_i|x_i) / |y_w_i|`,
      then averaged over examples, so a short answer weighs as much as a long one.

    The default stays `batch_tokens`: it is what every shipped recipe and its recorded results used, and it
    matches TRL. The two agree when all chosen completions have the same length.
    """
    if normalize not in SFT_NORMALIZATIONS:
        raise ValueError(f"sft: normalize must be one of {SFT_NORMALIZATIONS}, got {normalize!r}")
    if normalize == "per_sequence":
        logps = upcast(policy_chosen)
        loss = -logps / token_counts(chosen_lengths, logps)
    else:
        loss = spread_token_mean_nll(policy_chosen, chosen_lengths)
    metrics = {"nll/chosen": loss.detach().mean(), "logps/chosen": upcast(policy_chosen.detach()).mean()}
    return loss, metrics
