"""Judges: each takes alpaca_eval pairs (`instruction`, `output_1` = reference, `output_2` = model) and
returns one `{preference, raw_completion}` per pair, preference on alpaca_eval's 1..2 scale
(2: the model wins) or None for no judgment. `name` is the annotator recorded in annotations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError

JUDGES = ("rule", "reward_model", "openai")


@dataclass(frozen=True)
class JudgeSettings:
    kind: str
    model: str | None = None         # reward model location, or the endpoint's model name
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    seed: int = 0                       # output-order randomisation
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 120.0
    cache_path: Path | None = None
    batch_size: int = 8


def make_judge(settings: JudgeSettings):
    if settings.kind == "rule":
        from .rule import RuleJudge

        return RuleJudge()
    if settings.kind == "reward_model":
        from .reward_model import RewardModelJudge

        if not settings.model:
            raise UserError("The reward_model judge needs --judge-model: a local sequence-classification model directory.")
        return RewardModelJudge(settings.model, batch_size=settings.batch_size)
    if settings.kind == "openai":
        from .cache import JudgmentCache
        from .openai_judge import OpenAIJudge

        if not settings.model:
            raise UserError("The openai judge needs --judge-model: the model name the endpoint serves (e.g. gpt-4-1106-preview).")
        base_url = settings.base_url or "https://api.openai.com/v1"
        return OpenAIJudge(settings.model, base_url, settings.api_key_env, seed=settings.seed,
                           concurrency=settings.concurrency, max_retries=settings.max_retries,
                           timeout=settings.timeout, cache=JudgmentCache(settings.cache_path))
    raise UserError(f"Unknown judge '{settings.kind}'; choose one of {', '.join(JUDGES)}.")
