"""Held-out task accuracy of a run's live policy: greedy answers to the task's prompts, checked by its verifier.
Every training loop measures it before and after (pairwise, online RL, each round of the iterative loops)."""

from __future__ import annotations

from . import tasks
from .engine import TransformersEngine
from .generation import SamplingSettings


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
