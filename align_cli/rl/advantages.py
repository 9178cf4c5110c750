"""From rewards to the advantages and masks the loss sees: group advantages (GRPO or HAPO's token-level
group average), DAPO's dynamic-sampling filter, D^3S sample and token selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.d3s import select_samples, select_tokens
from ..losses.hapo import token_level_group_advantages
from ..losses.rl import group_advantages


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """`[P]` bool: groups whose G rewards are not all equal (DAPO dynamic sampling keeps only these; a group
    with equal rewards has zero advantage everywhere and gives no gradient)."""
    return (rewards != rewards[:, :1]).any(dim=1)


def advantages_of(rewards: torch.Tensor, lengths: torch.Tensor, token_level: bool = False,
                  fallback: float | None = None) -> torch.Tensor:
    """Advantages `[P, G]` of rewards `[P, G]`.

    GRPO: `(R - mean) / (std + 1e-6)` per group. With `token_level` (HAPO), each group's token-level group
    average with completion `lengths` `[P, G]`; with `fallback` set, a group where any |A| reaches it uses
    the GRPO advantages instead (the released HAPO code's safeguard, 5 there, against a few long
    completions dominating the token-weighted statistics).
    """
    grpo = group_advantages(rewards)
    if not token_level:
        return grpo
    weighted = torch.stack([token_level_group_advantages(r, n) for r, n in zip(rewards, lengths)])
    if fallback is not None:
        extreme = (weighted.abs() >= fallback).any(dim=1, keepdim=True)
        weighted = torch.where(extreme, grpo, weighted)
    return weighted


@dataclass
class Selection:
    """Which rollouts (flat indices into the step's rollouts) and which of their tokens get gradient."""

    rollouts: torch.Tensor         # [n] long
    token_mask: torch.Tensor | None  # [n, T] bool, None: every completion token


def d3s_selection(advantages: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor, m: int,
                  keep_percent: float, sample_scope: str, token_scope: str) -> Selection:
    """D^3S on a step's rollouts: advantages `[P, G]`, entropies and completion mask `[P*G, T]`.
    Sample level first (max-variance subsets of size m), then the top `keep_percent`% tokens by |A|*H
    among the kept rollouts."""
    kept = select_samples(advantages, m, sample_scope).reshape(-1).nonzero().squeeze(1)
    token_mask = None
    if keep_percent < 100.0:
        token_mask = select_tokens(advantages.reshape(-1)[kept], entropy[kept], mask[kept], keep_percent, token_scope)
    return Selection(kept, token_mask)
