"""SRPO: one network as a generative policy and a self-improvement policy (docs/ALGORITHMS.md section 4)."""

from __future__ import annotations

from . import register
from .common import log_ratios, preference_metrics, upcast
from .ranges import BETA, UNIT_INTERVAL, require_in_range


@register("srpo", beta=BETA, a=UNIT_INTERVAL.with_meaning("self-improvement weight"))
def srpo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    policy_chosen_given_rejected,
    policy_rejected_given_rejected,
    policy_chosen_given_chosen,
    policy_rejected_given_chosen,
    ref_chosen_given_rejected,
    ref_rejected_given_rejected,
    ref_chosen_given_chosen,
    ref_rejected_given_chosen,
    preference_probability=None,
    *,
    beta: float = 0.1,
    a: float = 0.8,
):
    """SRPO: `L = a * L_self + (1 - a) * L_gen`, with
    `L_self = (1/2 - beta*(hd(y_w|y_l) - hd(y_l|y_l)))^2 + (1/2 - beta*(hd(y_w|y_w) - hd(y_l|y_w)))^2` and
    `L_gen = (beta*(hd(y_w|y_l) + h(y_w) - hd(y_l|y_w) - h(y_l)) - 1)^2`.

    Choi et al., ICLR 2025, "Self-Improving Robust Preference Optimization", arXiv:2406.01660 (no official
    code). `h(y) = logp_pi(y|x) - logp_ref(y|x)` scores the plain prompt (generative policy); `hd(y'|y)`
    scores `y'` given the prompt plus the previous answer `y` shown as an example to improve on
    (self-improvement policy), with the same template for policy and reference. `*_given_rejected` is
    `y'|(x, y_l)`, `*_given_chosen` is `y'|(x, y_w)`.

    `preference_probability` `P = P(y_w > y_l)` gives soft labels: 1/2 becomes `P - 1/2` and 1 becomes
    `2P - 1`; absent, the labels are hard (`P = 1`). `a` weighs the self-improvement loss against the
    generative one (docs/ALGORITHMS.md's name; not checked against the paper's text, as no official code exists);
    its default 0.8 follows the only public, unofficial implementation, as does beta 0.1.
    """
    require_in_range("srpo", srpo.ranges, a=a)
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_given_rejected = upcast(policy_chosen_given_rejected) - upcast(ref_chosen_given_rejected)
    rejected_given_rejected = upcast(policy_rejected_given_rejected) - upcast(ref_rejected_given_rejected)
    chosen_given_chosen = upcast(policy_chosen_given_chosen) - upcast(ref_chosen_given_chosen)
    rejected_given_chosen = upcast(policy_rejected_given_chosen) - upcast(ref_rejected_given_chosen)

    if preference_probability is None:
        half_target, full_target = 0.5, 1.0
    else:
        probability = upcast(preference_probability)
        half_target, full_target = probability - 0.5, 2 * probability - 1

    # Improving on y_l and on y_w alike, the revision should prefer y_w to y_l by the preference margin.
    self_loss = (half_target - beta * (chosen_given_rejected - rejected_given_rejected)) ** 2 + (
        half_target - beta * (chosen_given_chosen - rejected_given_chosen)
    ) ** 2
    # Ties the generative policy to the self-improvement one: the generative margin h(y_w) - h(y_l) plus the
    # revisions' log-ratios must match the preference target 2P - 1, so pi learns what pi_dag would revise to.
    generative_loss = (
        beta * (chosen_given_rejected + chosen - rejected_given_chosen - rejected) - full_target
    ) ** 2
    loss = a * self_loss + (1 - a) * generative_loss

    metrics = preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)
    metrics["loss/self_improvement"] = self_loss.detach().mean()
    metrics["loss/generative"] = generative_loss.detach().mean()
    return loss, metrics
