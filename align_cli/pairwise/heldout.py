"""Held-out preference metrics of the pairwise trainer: the objective's loss and metrics on the eval pairs, and how
often the policy itself prefers the chosen answer."""

from __future__ import annotations

import torch

from ..data.batching import collate_groups
from .objective import objective_forward


@torch.no_grad()
def evaluate_pairs(model, reference, objective, dataset, pad_id: int, batch_size: int, device, fused: bool) -> dict:
    """Mean loss and metrics over held-out examples, plus `likelihood_accuracy`: how often the policy
    itself gives the chosen answer a higher per-token log-prob than the rejected one (meaningful
    before training too, unlike the implicit-reward accuracy, which is a tie at step 0)."""
    was_training = model.training
    model.eval()
    groups = list(dict.fromkeys(["chosen", "rejected", *objective.policy_groups]))
    totals: dict[str, float] = {}
    count = 0
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_groups(examples, groups, pad_id).to(device)
        loss, metrics, tensors = objective_forward(model, batch, objective, reference, fused)
        per_token = (tensors["policy_chosen"] / tensors["chosen_lengths"]
                     > tensors["policy_rejected"] / tensors["rejected_lengths"])
        metrics = {"loss": float(loss), **metrics, "likelihood_accuracy": float(per_token.float().mean())}
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * len(examples)
        count += len(examples)
    model.train(was_training)
    return {name: value / count for name, value in totals.items()}


