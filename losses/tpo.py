"""TPO and TPO-L: reference-free preference losses plus an NLL on a gold response (docs/ALGORITHMS.md section 3).

"Reference" in the TPO paper means the gold response `y_gold`, not a reference model: these losses take no
`ref_*` tensor, so the trainer loads no reference model for them.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import hyperparameters, register
from .common import preference_metrics, spread_token_mean_nll, token_counts, upcast
from .ranges import BELOW_ONE_HALF, BETA, NON_NEGATIVE

GOLD_WEIGHT = NON_NEGATIVE.with_meaning("weight of the gold response's NLL")


def _add_gold_nll(loss, metrics, policy_gold, gold_lengths, alpha: float):
    """`loss + alpha * NLL(y_gold)`, the NLL spread over examples so that its batch mean is the token mean.

    Skipped when alpha is 0 or the trainer did not compute the gold log-probs (it skips that forward pass when
    alpha is 0).
    """
    if alpha == 0 or policy_gold is None:
        return loss, metrics
    if gold_lengths is None:
        raise ValueError("TPO: policy_gold needs gold_lengths for the token-mean NLL")
    gold_nll = spread_token_mean_nll(policy_gold, gold_lengths)
    metrics["nll/gold"] = gold_nll.detach().mean()
    return loss + alpha * gold_nll, metrics


@register("tpo", beta=BETA, label_smoothing=BELOW_ONE_HALF.with_meaning("probability the label is wrong"),
          alpha=GOLD_WEIGHT)
def tpo(
    policy_chosen,
    policy_rejected,
    policy_gold=None,
    gold_lengths=None,
    *,
    beta: float = 0.01,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
):
    """TPO: `-(1-eps) * logsig(beta*M) - eps * logsig(-beta*M) + alpha * NLL(y_gold)`,
    `M = logp(y_w|x) - logp(y_l|x)` (summed log-probs, no reference model).

    The NLL is the token mean over all gold tokens of the batch. Saeidi et al. 2024, "Triple Preference
    Optimization: Achieving Better Alignment using a Single Step Optimization", arXiv:2405.16681. The
    authors' first code (github.com/sahsaeedi/triple-preference-optimization, utils/tpo_trainer.py) computes
    `losses.mean() + alpha * cross_entropy(gold)`, the same without label smoothing; their later code
    (github.com/sahsaeedi/TPO, utils/tpo_trainer.py) and TRL's TPOTrainer add label smoothing in this form.

    Defaults: beta 0.01 (TRL's TPOConfig, and the paper's table per docs/ALGORITHMS.md; the authors' code
    defaults to 0.1, its README runs 0.2); alpha 1.0 for base models (the authors' code and TRL; the
    paper's table gives 0.05 for instruct models); eps 0.
    """
    chosen, rejected = upcast(policy_chosen), upcast(policy_rejected)
    logits = beta * (chosen - rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)
    return _add_gold_nll(loss, metrics, policy_gold, gold_lengths, alpha)


@register("tpo_l", beta=BETA, gamma=NON_NEGATIVE.with_meaning("target reward margin"),
          label_smoothing=BELOW_ONE_HALF.with_meaning("probability the label is wrong"), alpha=GOLD_WEIGHT)
def tpo_l(
    policy_chosen,
    policy_rejected,
    chosen_lengths,
    rejected_lengths,
    policy_gold=None,
    gold_lengths=None,
    *,
    beta: float = 0.01,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
):
    """TPO-L (length-controlled): `-(1-eps) * logsig(z) - eps * logsig(-z) + alpha * NLL(y_gold)`,
    `z = beta * (lbar(y_w) - lbar(y_l)) - gamma`, `lbar(y) = logp(y|x) / |y|`.

    `gamma` is a target reward margin (SimPO-style); the authors' range is 0.5..10. Saeidi et al. 2024,
    arXiv:2405.16681; the authors' code (github.com/sahsaeedi/TPO, utils/tpo_trainer.py, `loss_type="tpo-l"`)
    and TRL's experimental TPOTrainer (`tpo_l_gamma`) compute the same, label smoothing eps included (the
    same conservative form as `tpo`'s; eps 0 is the paper's loss).
    beta defaults to 0.01 like TPO (TRL's one default for both); with per-token log-probs the preference term
    is much flatter than TPO's at the same beta, so larger values are worth a sweep.
    """
    chosen, rejected = upcast(policy_chosen), upcast(policy_rejected)
    chosen_mean = chosen / token_counts(chosen_lengths, chosen)
    rejected_mean = rejected / token_counts(rejected_lengths, rejected)
    logits = beta * (chosen_mean - rejected_mean) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = preference_metrics(beta, chosen_mean, rejected_mean, policy_chosen, policy_rejected)
    return _add_gold_nll(loss, metrics, policy_gold, gold_lengths, alpha)


def _gold_inputs_used(function):
    """`uses(params)`: the gold log-probs are needed only when alpha != 0, so the trainer skips the gold
    sequences (tokenisation and forward) with alpha 0 (see align_cli.pairwise.objective, losses.used_inputs)."""
    default_alpha = hyperparameters(function)["alpha"]

    def uses(params: dict) -> set[str]:
        return set() if params.get("alpha", default_alpha) == 0 else {"policy_gold", "gold_lengths"}

    return uses


tpo.uses = _gold_inputs_used(tpo)
tpo_l.uses = _gold_inputs_used(tpo_l)
