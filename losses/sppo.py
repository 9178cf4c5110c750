"""SPPO: self-play preference optimisation's squared loss on each response's log-ratio."""

from __future__ import annotations

from . import register
from .common import log_ratios, preference_metrics, upcast
from .ranges import POSITIVE


@register("sppo", beta=POSITIVE.with_meaning("1/eta, the inverse step size of the self-play update"))
def sppo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    chosen_win_probability=None,
    rejected_win_probability=None,
    *,
    beta: float = 0.001,
):
    """SPPO: `(h(y_w) - (P_w - 1/2)/beta)^2 + (h(y_l) - (P_l - 1/2)/beta)^2`.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675,
    Algorithm 1 (eq. 4.7 with eta = 1/beta): each response's log-ratio to the previous iterate regresses onto
    its centred win probability `P(y > pi_t | x)` against the current policy. The reference is the previous
    iterate pi_t. Without `chosen_win_probability`/`rejected_win_probability` the labels are hard, `P_w = 1`,
    `P_l = 0`: then this equals TRL's `loss_type="sppo_hard"` (trl/trainer/dpo_trainer.py,
    `(h_w - 0.5/beta)^2 + (h_l + 0.5/beta)^2`). The authors' code (github.com/uclaml/SPPO, sppo/trainer.py,
    `loss_type="sppo"`) averages the two squares instead of summing them: half this loss, the same optimum.
    beta defaults to 0.001, the authors' scripts' value (eta = 1000).
    """
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_target = 0.5 if chosen_win_probability is None else upcast(chosen_win_probability) - 0.5
    rejected_target = -0.5 if rejected_win_probability is None else upcast(rejected_win_probability) - 0.5
    loss = (chosen - chosen_target / beta) ** 2 + (rejected - rejected_target / beta) ** 2
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)
