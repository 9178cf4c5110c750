"""A recipe's weighted sum of loss terms, and what tensors it needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LossTerm
from .losses import LOSSES, tensor_inputs


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


class Objective:
    """`loss = sum_i weight_i * mean(loss_i)`; metrics of every term, plus each term's mean loss."""

    def __init__(self, terms: list[LossTerm]):
        self.terms = [Term(t.name, t.weight, t.params, tensor_inputs(LOSSES[t.name])) for t in terms]

    @property
    def inputs(self) -> set[str]:
        return {name for term in self.terms for name in term.inputs}

    @property
    def needs_reference(self) -> bool:
        return any(name.startswith("ref_") for name in self.inputs)

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
