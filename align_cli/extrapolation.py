"""APO's momentum step from two frozen checkpoints (ALGORITHMS.md section 6; He, Yuan, Gu 2024,
"Accelerated Preference Optimization").

The extrapolated policy is `log pi_{t+1} = (1+alpha) log pihat_{t+1} - alpha log pihat_t - log Z(x)`.
No model is trained for it; three things are computed from the two checkpoints instead:

- reference log-probs of the next iteration's pairs (`AnchorLogps`): per sequence
  `(1+alpha)*logp_{t+1} - alpha*logp_t`, exact for pairwise losses because `log Z(x)` cancels in the
  chosen-minus-rejected margin;
- sampling by per-token logits (`ExtrapolatedLogits`): `(1+alpha)*z_{t+1} - alpha*z_t`, then the usual
  temperature, top-p and softmax (token-level, so its sequence distribution is an approximation of pi_{t+1});
- sampling by weights (`extrapolated_weights`): `theta_{t+1} + alpha*(theta_{t+1} - theta_t)`, cheap and
  only a heuristic for the same thing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor

from .models import freeze, load_causal_lm
from .reference import LiveReference, cache_key, cached_or_computed, model_identity


@dataclass(frozen=True)
class AnchorLogps:
    """Reference log-probs as a weighted sum of frozen checkpoints' log-probs: `[(1.0, pihat_t)]` for a plain
    anchor, `[(1+alpha, pihat_t), (-alpha, pihat_{t-1})]` for APO's extrapolated one. Each checkpoint's
    log-probs go through the reference disk cache (`reference.cached_or_computed`), so a resumed iteration
    reuses them. Called by the trainer (`train(..., reference_logps=...)`) with the tokenised splits."""

    terms: tuple[tuple[float, str], ...]
    cache_dir: str | None = None

    @property
    def description(self) -> str:
        return " + ".join(f"{weight:g} x logp({location})" for weight, location in self.terms)

    def __call__(self, run, datasets: dict, groups: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        recipe, accelerator = run.recipe, run.accelerator
        totals: dict[str, dict[str, torch.Tensor]] = {}
        for weight, location in self.terms:
            model = freeze(load_causal_lm(location, recipe.model, run.dtype)).to(accelerator.device)
            live = LiveReference(model, contextlib.nullcontext, recipe.training.fused_logprobs, groups)
            for split, dataset in datasets.items():
                key = cache_key(model_identity(location), dataset._fingerprint,
                                {**run.tokenisation.key(), "dtype": str(run.dtype), "fused": recipe.training.fused_logprobs})
                provider, _ = cached_or_computed(live, dataset, list(range(len(dataset))), run.tokenizer.pad_token_id,
                                                 recipe.training.batch_size, accelerator.device, key, self.cache_dir,
                                                 accelerator.is_main_process)
                split_totals = totals.setdefault(split, {})
                for name, values in provider.table.items():
                    term = values if weight == 1.0 else weight * values  # one checkpoint: its log-probs unchanged
                    split_totals[name] = term if name not in split_totals else split_totals[name] + term
            del model, live
        return totals


def anchor_terms(current: str, previous: str | None, alpha: float) -> tuple[tuple[float, str], ...]:
    """The anchor of the iteration after `current`: `current` itself without momentum or history."""
    if previous is None or alpha == 0:
        return ((1.0, current),)
    return ((1.0 + alpha, current), (-alpha, previous))


@torch.no_grad()
def extrapolated_weights(current: torch.nn.Module, previous: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """`current` with every floating-point parameter and buffer set to `(1+alpha)*current - alpha*previous`."""
    previous_state = previous.state_dict()
    done: set[int] = set()  # tied weights (embeddings = LM head) are one tensor under two names: update it once
    for name, tensor in current.state_dict().items():
        if tensor.is_floating_point() and tensor.data_ptr() not in done:
            done.add(tensor.data_ptr())
            tensor.copy_((1.0 + alpha) * tensor - alpha * previous_state[name].to(tensor.device, tensor.dtype))
    return current


class ExtrapolatedLogits(LogitsProcessor):
    """Per-token `(1+alpha)*z_current - alpha*z_previous` inside `generate` of the current model.

    `generate` runs the current model with its KV cache and hands its next-token logits to this
    processor, which runs the previous model incrementally with a KV cache of its own: the whole
    (left-padded) prompt on the first call, then the one token sampled since. Positions follow the
    attention mask as `generate` computes them for the current model, so both models see the same
    sequence. Custom processors run before temperature and top-p, so those apply to the combined
    logits. One instance serves one `generate` call (its cache is that batch's)."""

    def __init__(self, previous: torch.nn.Module, alpha: float, prompt_attention_mask: torch.Tensor):
        self.previous, self.alpha = previous, alpha
        self.attention_mask = prompt_attention_mask
        self.cache = None
        self.seen = 0

    def _forward(self, input_ids: torch.LongTensor):
        if self.cache is None:
            new_tokens, mask = input_ids, self.attention_mask.to(input_ids.device)
        else:
            new_tokens = input_ids[:, self.seen:]
            mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(new_tokens.shape)], dim=1)
        positions = mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)[:, -new_tokens.shape[1]:]
        output = self.previous(input_ids=new_tokens, attention_mask=mask, position_ids=positions,
                               past_key_values=self.cache, use_cache=True)
        self.cache, self.attention_mask, self.seen = output.past_key_values, mask, input_ids.shape[1]
        return output.logits[:, -1, :]

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        previous = self._forward(input_ids).float()
        vocabulary = min(scores.shape[-1], previous.shape[-1])
        combined = scores.float().clone()
        combined[:, :vocabulary] = (1.0 + self.alpha) * combined[:, :vocabulary] - self.alpha * previous[:, :vocabulary]
        return combined.to(scores.dtype)


def extrapolated_logits_factory(previous: torch.nn.Module, alpha: float):
    """For `generation.generate(..., processor_factory=...)`: a fresh processor per batch, its prompt mask
    repeated like `generate` repeats the prompts for several samples each."""
    def make(encoded, num_samples: int) -> ExtrapolatedLogits:
        mask = encoded["attention_mask"].repeat_interleave(num_samples, dim=0)
        return ExtrapolatedLogits(previous, alpha, mask)

    return make


def save_directory(model, tokenizer, target: Path) -> Path:
    """A model as a Hugging Face directory (for engines that load from disk, vLLM)."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
