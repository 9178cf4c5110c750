"""The `reward_model` judge: a local sequence-classification reward model scores both outputs;
preference = 1 + sigmoid(r_model - r_reference) (the Bradley-Terry probability that the model's
output wins, on alpaca_eval's 1..2 scale)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...errors import UserError


def bradley_terry_preference(model_reward: float, reference_reward: float) -> float:
    return 1.0 + 1.0 / (1.0 + math.exp(-(model_reward - reference_reward)))


class RewardModelJudge:
    def __init__(self, location: str, batch_size: int = 8, max_length: int = 4096, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ...models import inference_device, resolve_model_location

        resolved = resolve_model_location(location)
        self.name = f"reward_model:{Path(location).name or location}"
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=dtype).eval()
        self.model.to(inference_device())
        if self.model.config.num_labels != 1:
            raise UserError(f"'{location}' has {self.model.config.num_labels} output labels; a reward model has one "
                            f"(a scalar score per sequence).")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the classification head reads the last non-pad token of each row, so it must know the pad id
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size, self.max_length = batch_size, max_length

    def render(self, instruction: str, output: str) -> str:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{instruction}\n\n{output}"

    @torch.no_grad()
    def rewards(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start: start + self.batch_size]
            encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False).to(device)
            scores.extend(self.model(**encoded).logits[:, 0].float().tolist())
        return scores

    def judge(self, pairs: list[dict]) -> list[dict]:
        reference = self.rewards([self.render(p["instruction"], p["output_1"]) for p in pairs])
        model = self.rewards([self.render(p["instruction"], p["output_2"]) for p in pairs])
        return [{"preference": bradley_terry_preference(m, r), "raw_completion": {"reward_model": m, "reward_reference": r}}
                for m, r in zip(model, reference)]
