"""One reward-model scorer: a Hugging Face sequence-classification model scoring (prompt, completion) pairs.

Used by online RL's `reward_model` reward (`rl/rewards.py`), the iterative methods' `reward_model` ranker
(`iterative/rankers.py`) and `align eval`'s `reward_model` judge (`eval/judges/reward_model.py`), so all three give
the same number for the same pair. How a pair becomes tokens, and why:

- Rendering. With a chat template the conversation is the prompt's messages as given (a string prompt is
  one user message; a system message stays) plus the completion as the assistant's turn, rendered by the
  *reward model's* template: that is the input such a model was trained on. Without a template the text is
  the prompt's message contents and the completion joined by a blank line.
- Special tokens. Rendered chat text already holds every special token the template writes (its BOS, turn
  markers), so it is tokenised with `add_special_tokens=False`; letting the tokenizer add its own would put
  a second BOS in front of the template's. Plain text gets the tokenizer's special tokens (BOS, or CLS/SEP
  for an encoder), as the model saw in training.
- Padding on the right. The classification head reads the last non-pad token of each row, and decoder
  models number positions from the first token whatever the attention mask says, so left padding would
  shift a short row's positions and make its score depend on what it was batched with. Right padding keeps
  each row's score equal to its score alone. The model's `pad_token_id` is set to the tokenizer's, since
  that is the id the head looks for.
- Truncation on the left, to `max_length` capped by the model's position table: the head scores the final
  token, so the end of the completion must survive; cutting on the right would score a text that stops
  mid-answer.
- float32 by default (a reward gap between two completions is a small difference of large logits), logits
  read as float32; the model on `device` (default `models.inference_device()`: the current GPU if any).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

PLAIN_SEPARATOR = "\n\n"


def conversation(prompt, completion: str) -> list[dict]:
    """The chat the reward model scores: the prompt's messages (a string is one user turn) plus the answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": completion}]


def plain_text(prompt, completion: str) -> str:
    """The text a reward model without a chat template scores: every message's content, then the answer."""
    parts = [prompt] if isinstance(prompt, str) else [message["content"] for message in prompt]
    return PLAIN_SEPARATOR.join([*parts, completion])


def scoring_length(max_length: int, tokenizer_limit: int | None, position_limit: int | None) -> int:
    """The longest input scored: `max_length`, but never past what the tokenizer or position table allows."""
    return min(limit for limit in (max_length, tokenizer_limit, position_limit) if limit)


class RewardModelScorer:
    """Loads a sequence-classification model once and scores (prompt, completion) pairs in batches; the score
    is the logit of output `label`. `label=None` requires a single-output model (a Bradley-Terry reward)."""

    def __init__(self, location: str, batch_size: int = 8, max_length: int = 4096, label: int | None = None,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import inference_device, resolve_model_location

        resolved = resolve_model_location(location)
        self.name = f"reward_model:{Path(location).name or location}"
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=dtype).eval()
        self.model.to(device or inference_device())
        num_labels = self.model.config.num_labels
        if label is None and num_labels != 1:
            raise UserError(f"'{location}' has {num_labels} output labels; a reward model has one (a scalar score "
                            f"per sequence).")
        if label is not None and not 0 <= label < num_labels:
            raise UserError(f"Reward model '{location}' has {num_labels} output labels; label: {label} is not one "
                            f"of 0..{num_labels - 1}.")
        self.label = label or 0
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        # a tokenizer that states no limit reports a huge sentinel (int(1e30)); it is no limit
        tokenizer_limit = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**9 else None
        self.max_length = scoring_length(max_length, tokenizer_limit,
                                         getattr(self.model.config, "max_position_embeddings", None))
        self.batch_size = batch_size

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt, completion: str) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(conversation(prompt, completion), tokenize=False)
        return plain_text(prompt, completion)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """One right-padded, left-truncated batch of rendered texts."""
        return self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                              add_special_tokens=not self.uses_chat_template)

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> list[float]:
        """One score per (prompt, completion); a prompt is a string or a list of chat messages."""
        texts = [self.render(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.encode(texts[start: start + self.batch_size]).to(device)
            scores += self.model(**encoded).logits[:, self.label].float().tolist()
        return scores
