"""f-DPO: DPO under an f-divergence constraint other than reverse KL (docs/ALGORITHMS.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register
from .common import log_ratios, preference_metrics
from .ranges import BETA, OPEN_UNIT_INTERVAL, POSITIVE, OneOf, require_in_range

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def exp_with_capped_slope(exponent: torch.Tensor, cap: float, largest: float) -> torch.Tensor:
    """`exp(e)` for `e <= cap`, continued by its tangent at `cap` beyond: `exp(cap) * (1 + e - cap)`, and
    constant once that tangent would pass `largest`.

    Value and slope are continuous up to there and the slope never exceeds `exp(cap)`: the derivative is
    clamped rather than the value, so an example beyond the cap keeps a bounded gradient in the right
    direction. Only where the value itself would overflow (`e > cap + largest / exp(cap)`, about 1.5e4 past
    the cap at the defaults in float32) does it stop growing."""
    tangent_end = cap + max(largest / math.exp(cap) - 1.0, 0.0)
    exponent = torch.clamp(exponent, max=tangent_end)
    capped = torch.clamp(exponent, max=cap)
    return torch.exp(capped) * (1 + (exponent - capped))


def f_prime_of_log_ratio(log_ratio: torch.Tensor, divergence: str, alpha: float, max_exponent: float,
                         largest: float = math.inf) -> torch.Tensor:
    """`psi(h) = f'(u)` at `u = exp(h)`, up to an additive constant (which cancels in `psi_w - psi_l`).

    `|dpsi/dh|` is at most `exp(max_exponent)` for every divergence: the exponentials of `-h` and `-alpha*h`
    (a completion the policy finds far less likely than the reference) follow their tangent beyond
    `max_exponent`, and `|psi|` stays below `largest` (`exp_with_capped_slope`); js and reverse KL have slopes
    of at most 1 anyway.
    """
    if divergence == "reverse_kl":  # f(u) = u log u, f'(u) = log u + 1
        return log_ratio
    if divergence == "forward_kl":  # f(u) = -log u, f'(u) = -1/u
        return -exp_with_capped_slope(-log_ratio, max_exponent, largest)
    if divergence == "js":  # f'(u) = log(2u / (1 + u)) = log 2 + logsig(h)
        return F.logsigmoid(log_ratio)
    if divergence == "alpha":  # f'(u) = (1 - u^-alpha) / alpha; d/dh of exp(-alpha*h)/alpha is exp(-alpha*h)
        return -exp_with_capped_slope(-alpha * log_ratio, max_exponent, largest * alpha) / alpha
    raise ValueError(f"fdpo: unknown divergence '{divergence}', expected one of {DIVERGENCES}")


# Headroom below the largest finite value: a loss weight or a sum over the batch may scale a per-example
# gradient by a small factor before it reaches the inputs, and `psi_w - psi_l` may double a value.
HEADROOM = 2.0


def exponent_cap_for_inputs(max_exponent: float, beta: float, compute_dtype: torch.dtype,
                            *inputs: torch.Tensor) -> float:
    """`max_exponent`, lowered so that the loss's gradient to every input is finite in that input's dtype and
    `exp(cap)` is finite in the dtype the loss is computed in.

    The gradient of `-logsig(beta * (psi_w - psi_l))` to `h` is at most `beta * max|dpsi/dh|` =
    `beta * exp(cap)`, so the cap is `log(dtype max / (HEADROOM * beta))` for the narrowest input dtype:
    about 12.7 for fp16 at beta 0.1 (0.1 * exp(12.7) * 2 ~ 65504), above 80 for bf16 and fp32.
    """
    narrowest = min(torch.finfo(x.dtype).max for x in inputs if x.is_floating_point())
    largest_psi = largest_psi_value(beta, compute_dtype)
    return min(max_exponent, math.log(narrowest / (HEADROOM * beta)), math.log(largest_psi))


def largest_psi_value(beta: float, compute_dtype: torch.dtype) -> float:
    """The largest `|psi|` for which `psi_w - psi_l` and `beta * (psi_w - psi_l)` stay finite in
    `compute_dtype`, with headroom."""
    return torch.finfo(compute_dtype).max / (2 * HEADROOM * max(beta, 1.0))


@register("fdpo", beta=BETA, divergence=OneOf(DIVERGENCES),
          alpha=OPEN_UNIT_INTERVAL.with_meaning("alpha-divergence order, paper convention"),
          max_exponent=POSITIVE.with_meaning("clamp of the exponent of exp"))
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

    Numerical safety: the loss is computed in float32 or wider. Beyond the exponent `max_exponent` the
    exponentials of `-h` / `-alpha*h` continue along their tangent (`f_prime_of_log_ratio`), so the loss stays
    finite (the tangent stops only where it would overflow) and its gradient to the log-probs is at most
    `beta * exp(cap)`. The cap is `max_exponent`, lowered where needed so that this bound is finite in the
    narrowest input dtype (`exponent_cap_for_inputs`): about 12.7 for fp16 inputs at beta 0.1, and 80 (the
    default) for bf16 and fp32, whose gradients can still reach `beta * exp(80) ~ 5e33`: finite, but far past
    what gradient clipping handles well, so lower `max_exponent` (e.g. to 20) for forward KL or alpha on long
    sequences. Inside the cap the values are the exact formula. The paper used a much smaller beta for forward
    KL (0.03) than for reverse KL (0.9 on Anthropic-HH with Pythia-2.8B).
    """
    if divergence == "alpha":
        require_in_range("fdpo", fdpo.ranges, alpha=alpha)
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    cap = exponent_cap_for_inputs(max_exponent, beta, chosen.dtype, policy_chosen, policy_rejected, ref_chosen,
                                  ref_rejected)
    largest = largest_psi_value(beta, chosen.dtype)
    chosen_psi = f_prime_of_log_ratio(chosen, divergence, alpha, cap, largest)
    rejected_psi = f_prime_of_log_ratio(rejected, divergence, alpha, cap, largest)
    loss = -F.logsigmoid(beta * (chosen_psi - rejected_psi))
    # Rewards are logged as beta * h for every divergence, like TRL; psi is monotone in h, so accuracy agrees.
    return loss, preference_metrics(beta, chosen, rejected, policy_chosen, policy_rejected)


# Only psi(h) = h (reverse KL, DPO itself) makes the loss a function of the reference margin alone.
fdpo.reference_margin_only = lambda params: params.get("divergence", "reverse_kl") == "reverse_kl"
