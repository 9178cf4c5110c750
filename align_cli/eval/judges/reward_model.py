"""The `reward_model` judge: a local sequence-classification reward model scores both outputs;
preference = 1 + sigmoid(r_model - r_reference) (the Bradley-Terry probability that the model's
output wins, on alpaca_eval's 1..2 scale). Scoring is `align_cli.reward_model.RewardModelScorer`,
shared with online RL's reward and the iterative ranker."""

from __future__ import annotations

import math

import torch

from ...reward_model import RewardModelScorer


def bradley_terry_preference(model_reward: float, reference_reward: float) -> float:
    return 1.0 + 1.0 / (1.0 + math.exp(-(model_reward - reference_reward)))


class RewardModelJudge:
    def __init__(self, location: str, batch_size: int = 8, max_length: int = 4096, dtype: torch.dtype = torch.float32):
        self.scorer = RewardModelScorer(location, batch_size=batch_size, max_length=max_length, dtype=dtype)
        self.name = self.scorer.name

    def judge(self, pairs: list[dict]) -> list[dict]:
        instructions = [p["instruction"] for p in pairs]
        reference = self.scorer.score(instructions, [p["output_1"] for p in pairs])
        model = self.scorer.score(instructions, [p["output_2"] for p in pairs])
        return [{"preference": bradley_terry_preference(m, r), "raw_completion": {"reward_model": m, "reward_reference": r}}
                for m, r in zip(model, reference)]
