"""Held-out measurements: preference metrics on eval pairs, and task accuracy of generated answers."""

from __future__ import annotations

import torch

from . import tasks
from .data.batching import collate_groups
from .engine import TransformersEngine
from .generation import SamplingSettings


@torch.no_grad()
def evaluate_pairs(model, reference, objective, dataset, pad_id: int, batch_size: int, device, fused: bool) -> dict:
    """Mean loss and metrics over held-out examples, plus `likelihood_accuracy`: how often the policy
    itself gives the chosen answer a higher per-token log-prob than the rejected one (meaningful
    before training too, unlike the implicit-reward accuracy, which is a tie at step 0)."""
    from .trainer import objective_forward

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


def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int,
                  system_prompt: str | None = None) -> dict:
    """Greedy answers to held-out task prompts, checked by the task's verifier."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    engine = TransformersEngine(model, tokenizer, system_prompt)  # the live policy of the run
    answers = [samples[0] for samples in engine.generate([r["prompt"] for r in rows], settings)]
    correct = [tasks.is_correct(text, row["answer"]) for text, row in zip(answers, rows)]
    lenient = [tasks.is_correct_lenient(text, row["answer"]) for text, row in zip(answers, rows)]
    return {
        "task_accuracy": sum(correct) / len(rows),
        "answer_accuracy_lenient": sum(lenient) / len(rows),
        "mean_answer_chars": sum(len(a) for a in answers) / len(rows),
        "examples": [{"prompt": r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"],
                      "answer": a, "correct": c} for r, a, c in list(zip(rows, answers, correct))[:5]],
    }
