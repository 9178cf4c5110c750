"""The `rule` judge: on a verifiable set, the output the task's verifier accepts wins."""

from __future__ import annotations

from ... import tasks
from ...errors import UserError

REFERENCE_WINS, DRAW, MODEL_WINS = 1.0, 1.5, 2.0


def rule_preference(model_correct: bool, reference_correct: bool) -> float:
    """alpaca_eval's scale: both right or both wrong is a draw, else the right one wins."""
    if model_correct == reference_correct:
        return DRAW
    return MODEL_WINS if model_correct else REFERENCE_WINS


class RuleJudge:
    name = "rule"

    def check(self, rows: list[dict]) -> None:
        """Every row needs its verifiable `answer`; checked before any answer is generated."""
        for row in rows:
            if row.get("answer") is None:
                raise UserError(f"The rule judge needs a verifiable answer per instruction; "
                                f"{row['instruction'][:70]!r} has none. Use a shipped set (builtin:arithmetic_prompts) "
                                f"or instruction rows with an `answer` field.")

    def judge(self, pairs: list[dict]) -> list[dict]:
        """Each pair needs `answer` (the verifiable solution), `output_1` (reference), `output_2` (model)."""
        self.check(pairs)
        judgments = []
        for pair in pairs:
            model_correct = tasks.is_correct(pair["output_2"], pair["answer"])
            reference_correct = tasks.is_correct(pair["output_1"], pair["answer"])
            judgments.append({"preference": rule_preference(model_correct, reference_correct),
                              "raw_completion": {"model_correct": model_correct,
                                                 "reference_correct": reference_correct}})
        return judgments
