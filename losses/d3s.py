"""D^3S, dynamic dual-level down-sampling for GRPO/GSPO (docs/ALGORITHMS.md section 8).

Wang et al., ICLR 2026, "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for
Efficient Policy Optimization". Advantages are computed with all G rollouts of a prompt; then

- sample level: keep the subset of m rollouts whose advantages have the largest variance, within each
  group (D3S-I) or across the whole batch; advantages are not re-normalised;
- token level: among the kept rollouts keep the top K% of tokens by `|A_{i,t}| * H_{i,t}` (H the policy's
  full-vocabulary entropy at that position), batch-global by default or per sequence; the rest get no
  gradient;
- schedule: `[m_p, K_p] = (1-p) [m_init, K_init] + p [m_final, K_final]`, p the training progress.

The paper's schedule values are not public; the defaults live in the recipe schema (`method.rl.d3s`).
"""

from __future__ import annotations

import math

import torch


def max_variance_subset(values: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (ascending) of the size-`m` subset of `values` with the largest variance, exactly.

    A maximum-variance subset is always the k largest plus the m-k smallest values for some k: the variance
    is proportional to the sum of squared pairwise differences, convex in each member, so swapping a chosen
    value for the largest or the smallest unchosen one never lowers it. So sort once and scan k = 0..m with prefix sums of the values and their squares: O(n log n). Ties between
    equal-variance subsets go to the smallest k. `m >= len(values)` returns every index.
    """
    values = values.detach().reshape(-1).to(torch.float64)
    n = values.numel()
    if m < 0:
        raise ValueError(f"subset size must be non-negative, got {m}")
    if m >= n:
        return torch.arange(n, device=values.device)
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    order = torch.argsort(values, stable=True)
    ordered = values[order] - values.mean()  # centred: the variance formula below cancels less
    zero = ordered.new_zeros(1)
    sums = torch.cat([zero, ordered.cumsum(0)])
    squares = torch.cat([zero, (ordered * ordered).cumsum(0)])
    largest = torch.arange(m + 1, device=values.device)    # k: how many of the largest values
    smallest = m - largest
    subset_sum = sums[smallest] + sums[n] - sums[n - largest]
    subset_squares = squares[smallest] + squares[n] - squares[n - largest]
    variance = subset_squares / m - (subset_sum / m) ** 2
    k = int(torch.argmax(variance))
    chosen = torch.cat([order[: m - k], order[n - k:]])
    return torch.sort(chosen).values


def select_samples(advantages: torch.Tensor, m: int, scope: str = "group") -> torch.Tensor:
    """Sample-level D3S: a boolean mask `[P, G]` keeping, for advantages `[P, G]` (P prompts, G rollouts),
    the max-variance subset of size `m` within each group (`scope="group"`, D3S-I) or of size `m * P` across
    the batch (`scope="batch"`)."""
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [prompts, G], got {tuple(advantages.shape)}")
    keep = torch.zeros_like(advantages, dtype=torch.bool)
    if scope == "group":
        for row in range(advantages.shape[0]):
            keep[row, max_variance_subset(advantages[row], m)] = True
    elif scope == "batch":
        flat = keep.view(-1)
        flat[max_variance_subset(advantages.reshape(-1), m * advantages.shape[0])] = True
    else:
        raise ValueError(f"sample selection scope must be 'group' or 'batch', got {scope!r}")
    return keep


def kept_token_count(valid_tokens: int, keep_percent: float) -> int:
    """`ceil(K% of valid_tokens)`, at most all of them (rounded first so that 30% of 10 is 3, not 4)."""
    return min(valid_tokens, math.ceil(round(valid_tokens * keep_percent / 100.0, 9)))


def select_tokens(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, keep_percent: float,
                  scope: str = "batch") -> torch.Tensor:
    """Token-level D3S: a boolean mask `[B, T]` keeping the top `keep_percent`% of the valid tokens
    (`mask`) by `|A_{i,t}| * H_{i,t}`.

    `advantages` is `[B]` (one per rollout) or `[B, T]`; `entropy` `[B, T]`. `scope="batch"` keeps exactly
    `ceil(K% of all valid tokens)` over the batch; `scope="sequence"` keeps `ceil(K%)` of each row's valid
    tokens. Ties are broken by position (stable sort), so the count is always exact.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(entropy)
    scores = (advantages.detach().abs() * entropy.detach()).to(torch.float64)
    scores = scores.masked_fill(~mask, float("-inf"))
    if scope == "batch":
        rows, counts = scores.reshape(1, -1), [kept_token_count(int(mask.sum()), keep_percent)]
    elif scope == "sequence":
        rows, counts = scores, [kept_token_count(int(n), keep_percent) for n in mask.sum(dim=1)]
    else:
        raise ValueError(f"token selection scope must be 'batch' or 'sequence', got {scope!r}")
    order = torch.argsort(rows, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    keep = ranks < torch.tensor(counts, device=rows.device)[:, None]
    return keep.reshape(mask.shape) & mask


def linear_schedule(progress: float, start: float, end: float) -> float:
    """`(1 - p) * start + p * end` with p clamped to [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return (1.0 - p) * start + p * end


def d3s_schedule(progress: float, m_init: int, m_final: int, keep_init: float, keep_final: float) -> tuple[int, float]:
    """`(m_p, K_p)` at training progress p: m rounded half up to an integer, K in percent."""
    m = math.floor(linear_schedule(progress, m_init, m_final) + 0.5)
    return m, linear_schedule(progress, keep_init, keep_final)
