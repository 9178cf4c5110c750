"""HAPO's adaptive temperature sampling as a `transformers` logits processor.

At each decoding step the processor takes the entropy of the untempered next-token distribution, normalises
it with the previous training step's statistics (`align_cli.losses.hapo.EntropyStats`) into `ht` in [-1, 1],
and divides the logits by `1 + tau * ht`. `generate` then applies its own temperature `T_base` (custom
processors run before the sampling warpers), so the effective temperature is `T_base * (1 + tau * ht)`:
hotter where the policy is uncertain, cooler where it is sure. On the first step there are no previous
statistics: the processor runs with `stats=None`, leaves the logits as they are (factor 1) and only records.

It records, per generated row and decoding step, the factor it applied and the untempered entropy
(`take_records`, read by `generation.decode` after each `generate` call). On the fast path (CUDA by default) the
same rule runs inside the compiled decode step instead (`fast_sampling`, `fast_generation.AdaptiveSampling`),
which records the same two numbers per completion token. The rollouts then carry each
token's sampling temperature, so that pi_old, pi_theta and the reference score each token under the
temperature it was actually drawn at, and the untempered entropies, whose statistics normalise the next
step's sampling (the same quantity this processor measures).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..losses.hapo import EntropyStats, entropy_statistics, normalise_entropy


class AdaptiveTemperature(LogitsProcessor):
    def __init__(self, stats: EntropyStats | None, tau: float, sign: str = "paper"):
        self.stats, self.tau, self.sign = stats, tau, sign
        self.factor_sum, self.positions = 0.0, 0
        self._factors: list[torch.Tensor] = []
        self._entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probabilities = torch.softmax(scores.float(), dim=-1)
        entropy = torch.special.entr(probabilities).sum(dim=-1)  # entr(0) = 0: masked logits are safe
        if self.stats is None:
            factor = torch.ones_like(entropy)
        else:
            factor = 1.0 + self.tau * normalise_entropy(entropy, self.stats, self.sign)
        self.factor_sum += float(factor.sum())
        self.positions += factor.numel()
        self._factors.append(factor.float().cpu())
        self._entropies.append(entropy.float().cpu())
        return scores / factor[:, None].to(scores.dtype)

    def fast_sampling(self):
        """The same rule for the fast path (`fast_generation.AdaptiveSampling`), computed inside its decode step."""
        from ..fast_generation import AdaptiveSampling

        return AdaptiveSampling(self.tau, self.sign, self.stats)

    def count_factors(self, factors: list[list[float]]) -> None:
        """Count the fast path's recorded factors (one list per completion) into `mean_factor`."""
        self.factor_sum += sum(sum(row) for row in factors)
        self.positions += sum(len(row) for row in factors)

    def take_records(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(factors, untempered entropies)`, each `[rows, steps]`, of the decoding steps since the last call
        (one `generate` call), and forget them. Row r is `generate`'s output row r."""
        factors, entropies = torch.stack(self._factors, dim=1), torch.stack(self._entropies, dim=1)
        self._factors, self._entropies = [], []
        return factors, entropies

    @property
    def mean_factor(self) -> float:
        """The mean `1 + tau * ht` over every decoding position so far (logged as hapo/temperature_factor)."""
        return self.factor_sum / max(self.positions, 1)


def sampling_statistics(sampling_entropies: list[list[float]], rho: float) -> EntropyStats:
    """The statistics that normalise the next step's adaptive temperature: those of the untempered entropies
    recorded at every completion token of this step's rollouts (`Rollouts.sampling_entropies`), the quantity
    the processor itself measures, whatever temperature the loss side scores at."""
    entropies = torch.tensor([value for row in sampling_entropies for value in row], dtype=torch.float64)
    return entropy_statistics(entropies, torch.ones_like(entropies, dtype=torch.bool), rho)
