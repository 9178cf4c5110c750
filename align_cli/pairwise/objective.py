"""A recipe's weighted sum of loss terms, which sequence groups it needs computed, and the one forward of the
policy (and reference) that feeds it (`objective_forward`: training and the held-out pairs alike)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LossTerm
from ..data.batching import GroupedBatch
from ..logprobs import sequence_logps
from ..losses import LOSSES, SEQUENCE_GROUPS, used_inputs


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    params: dict
    inputs: dict  # tensor name -> required

    def __call__(self, tensors: dict[str, torch.Tensor]):
        arguments = {name: tensors[name] for name in self.inputs if name in tensors}
        missing = [name for name, required in self.inputs.items() if required and name not in tensors]
        if missing:
            raise KeyError(f"loss '{self.name}' needs {missing}, which this trainer did not compute")
        return LOSSES[self.name](**arguments, **self.params)


def _group_of(tensor_name: str) -> tuple[str, str] | None:
    """`policy_chosen` -> ('policy', 'chosen'); `gold_lengths` -> ('lengths', 'gold'); else None."""
    for prefix in ("policy_", "ref_"):
        if tensor_name.startswith(prefix) and tensor_name[len(prefix):] in SEQUENCE_GROUPS:
            return prefix[:-1], tensor_name[len(prefix):]
    if tensor_name.endswith("_lengths") and tensor_name[: -len("_lengths")] in SEQUENCE_GROUPS:
        return "lengths", tensor_name[: -len("_lengths")]
    return None


class Objective:
    """`loss = sum_i weight_i * mean(loss_i)`; metrics of every term, plus each term's mean loss."""

    def __init__(self, terms: list[LossTerm]):
        self.terms = [Term(t.name, t.weight, t.params, used_inputs(LOSSES[t.name], t.params)) for t in terms]
        found = [g for name in self.inputs if (g := _group_of(name))]
        order = list(SEQUENCE_GROUPS)
        self.policy_groups = sorted({g for kind, g in found if kind in ("policy", "lengths")}, key=order.index)
        self.reference_groups = sorted({g for kind, g in found if kind == "ref"}, key=order.index)
        # The reference scores the same sequences as the policy, in the same forward layout.
        extra = set(self.reference_groups) - set(self.policy_groups)
        if extra:
            self.policy_groups = sorted(set(self.policy_groups) | extra, key=order.index)

    @property
    def inputs(self) -> set[str]:
        return {name for term in self.terms for name in term.inputs}

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_groups)

    def __call__(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = 0.0
        metrics: dict[str, float] = {}
        for term in self.terms:
            per_example, term_metrics = term(tensors)
            mean = per_example.mean()
            total = total + term.weight * mean
            metrics[f"loss/{term.name}"] = float(mean.detach())
            metrics.update({k: float(v) for k, v in term_metrics.items()})
        return total, metrics


def objective_forward(model, batch: GroupedBatch, objective: Objective, reference, fused: bool):
    """One forward of the policy over every group the objective needs, then the loss. An offloaded reference
    (`reference.offload`) starts copying its weights first, so the copy overlaps the policy's forward."""
    if (prefetch := getattr(reference, "prefetch", None)) is not None:
        prefetch()
    policy = sequence_logps(model, batch.sequences, fused=fused)
    tensors = {f"policy_{name}": policy.sums[positions] for name, positions in batch.groups.items()}
    tensors.update({f"{name}_lengths": lengths for name, lengths in batch.lengths.items()})
    tensors.update(batch.labels)
    if reference is not None:
        tensors.update(reference(batch))
    loss, metrics = objective(tensors)
    return loss, metrics, tensors
