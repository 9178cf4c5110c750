"""f-DPO: DPO under an f-divergence constraint other than reverse KL (ALGORITHMS.md section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from .common import log_ratios, preference_metrics

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def f_prime_of_log_ratio(
    log_ratio: torch.Tensor, divergence: str, alpha: float, max_exponent: float
) -> torch.Tensor:
    """`psi(h) = f'(u)` at `u = exp(h)`, up to an additive constant (which cancels in `psi_w - psi_l`).

    The exponents `-h` and `-alpha*h` are clamped at `max_exponent`: a completion the policy finds far less
    likely than the reference (h of order -100 and below) would otherwise overflow to inf and turn the
    gradients into NaN. Beyond the clamp psi is constant, so those examples get no gradient through psi.
    """
    if divergence == "reverse_kl":  # f(u) = u log u, f'(u) = log u + 1
        return log_ratio
    if divergence == "forward_kl":  # f(u) = -log u, f'(u) = -1/u
        return -torch.exp(torch.clamp(-log_ratio, max=max_exponent))
    if divergence == "js":  # f'(u) = log(2u / (1 + u)) = log 2 + logsig(h)
        return F.logsigmoid(log_ratio)
    if divergence == "alpha":  # f'(u) = (1 - u^-alpha) / alpha
        return -torch.exp(torch.clamp(-alpha * log_ratio, max=max_exponent)) / alpha
    raise ValueError(f"fdpo: unknown divergence '{divergence}', expected one of {DIVERGENCES}")


@register("fdpo")
def fdpo(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    max_exponent: float = 80.0,
):
    """f-DPO: `-logsig(beta * (psi(h(y_w)) - psi(h(y_l))))` with `psi = f'` of the chosen f-divergence.

    Wang et al., ICLR 2024, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", arXiv:2309.16240. As a function of the log-ratio `h`:

    - `reverse_kl`: `psi = h` (exactly DPO);
    - `forward_kl`: `psi = -exp(-h)`;
    - `js` (Jensen-Shannon): `psi = logsig(h)`;
    - `alpha` (0 < alpha < 1): `psi = -exp(-alpha*h) / alpha`; alpha -> 0 tends to reverse KL, alpha -> 1 to
      forward KL.

    `alpha` follows the paper. TRL >= 0.29 (`f_divergence_type="alpha_divergence"`) computes
    `f'(u) = (u^(a-1) - 1)/(a-1)` with `a = f_alpha_divergence_coef`, so `a = 1 - alpha` (TRL <= 0.28 used the
    paper's alpha directly). TRL's `js_divergence` is our `js`.

    `max_exponent` bounds the exponent of `exp` (see `f_prime_of_log_ratio`). This function always computes in
    float32 or wider, where 80 is safe (exp(80) ~ 5.5e34) for fp32, bf16 and fp16 inputs alike; use ~11
    (exp(11) ~ 6e4 < 65504) if the psi values are to be held in fp16. Keep `beta * exp(max_exponent) / alpha`
    well below the dtype's maximum (fp32: ~3e38). The paper used a much smaller beta for forward KL (0.03)
    than for reverse KL (0.9 on Anthropic-HH with Pythia-2.8B).
    """
    if divergence == "alpha" and not 0.0 < alpha < 1.0:
        raise ValueError(f"fdpo: alpha must lie in (0, 1) (paper convention), got {alpha}")
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_psi = f_prime_of_log_ratio(chosen, divergence, alpha, max_exponent)
    rejected_psi = f_prime_of_log_ratio(rejected, divergence, alpha, max_exponent)
    loss = -F.logsigmoid(beta * (chosen_psi - rejected_psi))
    # Rewards are logged as beta * h for every divergence, like TRL; psi is monotone in h, so accuracy agrees.
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)
