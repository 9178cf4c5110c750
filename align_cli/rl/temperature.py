"""HAPO's adaptive temperature sampling as a `transformers` logits processor.

At each decoding step the processor takes the entropy of the untempered next-token distribution, normalises
it with the previous training step's statistics (`align_cli.losses.hapo.EntropyStats`) into `ht` in [-1, 1],
and divides the logits by `1 + tau * ht`. `generate` then applies its own temperature `T_base` (custom
processors run before the sampling warpers), so the effective temperature is `T_base * (1 + tau * ht)`:
hotter where the policy is uncertain, cooler where it is sure. The trainer leaves it off on the first step,
which has no previous statistics.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..losses.hapo import EntropyStats, normalise_entropy


class AdaptiveTemperature(LogitsProcessor):
    def __init__(self, stats: EntropyStats, tau: float, sign: str = "paper"):
        self.stats, self.tau, self.sign = stats, tau, sign
        self.factor_sum, self.positions = 0.0, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probabilities = torch.softmax(scores.float(), dim=-1)
        entropy = torch.special.entr(probabilities).sum(dim=-1)  # entr(0) = 0: masked logits are safe
        factor = 1.0 + self.tau * normalise_entropy(entropy, self.stats, self.sign)
        self.factor_sum += float(factor.sum())
        self.positions += factor.numel()
        return scores / factor[:, None].to(scores.dtype)

    @property
    def mean_factor(self) -> float:
        """The mean `1 + tau * ht` over every decoding position so far (logged as hapo/temperature_factor)."""
        return self.factor_sum / max(self.positions, 1)
