"""APO's momentum step from two frozen checkpoints (docs/ALGORITHMS.md section 6; He, Yuan, Gu 2024,
"Accelerated Preference Optimization").

The extrapolated policy is `log pi_{t+1} = (1+alpha) log pihat_{t+1} - alpha log pihat_t - log Z(x)`.
No model is trained for it; three things are computed from the two checkpoints instead:

- reference log-probs of the next iteration's pairs (`AnchorLogps`): per sequence
  `(1+alpha)*logp_{t+1} - alpha*logp_t`, minus `log Z(x)` where the loss needs it. `log Z(x) =
  log sum_y pihat_{t+1}(y)^(1+alpha) pihat_t(y)^(-alpha)` (alpha times the Renyi divergence of order 1+alpha
  between the two checkpoints) is the same for a prompt's chosen and rejected answers, so it cancels exactly
  in losses of the margin `h(y_w) - h(y_l)` (dpo, cdpo, rdpo, hinge, fdpo with reverse KL). It does not
  cancel in SPPO's per-response squares, IPO's length-normalised margin (`c/|y_w| - c/|y_l|` is not 0) or
  f-DPO's nonlinear psi; for those it is estimated per prompt from the K responses sampled from pihat_{t+1}
  (`log_normaliser_estimate`);
- sampling by per-token logits (`ExtrapolatedLogits`): `(1+alpha)*z_{t+1} - alpha*z_t`, then the usual
  temperature, top-p and softmax (token-level, so its sequence distribution is an approximation of pi_{t+1});
- sampling by weights (`extrapolated_weights`): `theta_{t+1} + alpha*(theta_{t+1} - theta_t)`, cheap and
  only a heuristic for the same thing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor

from ..models import freeze, load_causal_lm
from ..pairwise.reference import LiveReference, cache_key, cached_or_computed, model_identity


def needs_normalised_anchor(terms) -> list[str]:
    """The names of the recipe's loss terms (`LossTerm`s) that a per-prompt shift of the reference (the anchor's
    missing -log Z(x)) changes: every loss with a reference that does not declare it sees only the reference
    margin of one prompt (losses.reference_margin_only)."""
    from ..losses import LOSSES, needs_reference, reference_margin_only

    def shift_invariant(term) -> bool:
        function = LOSSES[term.name]
        return not needs_reference(function) or reference_margin_only(function, term.params)

    return [term.name for term in terms if not shift_invariant(term)]


def log_normaliser_estimate(anchor_logps: torch.Tensor, sampler_logps: torch.Tensor) -> torch.Tensor:
    """`log Z = log sum_y exp(A(y))` of an unnormalised log-density `A` (the anchor), from responses
    `y_1..y_K ~ q` of one prompt: `log mean_j exp(A(y_j) - log q(y_j))` (importance sampling; shapes `[..., K]`).

    For APO's anchor `A = (1+a) logp_{t+1} - a logp_t` sampled from `q = pihat_{t+1}` this is
    `log mean_j exp(a * (logp_{t+1}(y_j) - logp_t(y_j)))`: the log of the mean of the importance weights that,
    normalised, reweight the samples to the extrapolated policy. Consistent as K grows (for finite K the log of
    the mean is biased low by Jensen's inequality); valid only when the y_j really are draws from q.
    """
    weights = anchor_logps.double() - sampler_logps.double()
    return torch.logsumexp(weights, dim=-1) - math.log(weights.shape[-1])


@dataclass(frozen=True)
class NormaliserSamples:
    """The K responses sampled for each prompt from the checkpoint `sampled_from` (one of the anchor's terms, at
    temperature 1 without top-p), which `AnchorLogps` uses to estimate and subtract `log Z(x)` per prompt."""

    sampled_from: str
    prompts: tuple
    responses: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class AnchorLogps:
    """Reference log-probs as a weighted sum of frozen checkpoints' log-probs: `[(1.0, pihat_t)]` for a plain
    anchor, `[(1+alpha, pihat_t), (-alpha, pihat_{t-1})]` for APO's extrapolated one. Each checkpoint's
    log-probs go through the reference disk cache (`reference.cached_or_computed`), so a resumed iteration
    reuses them. Called by the trainer (`train(..., reference_logps=...)`) with the tokenised splits."""

    terms: tuple[tuple[float, str], ...]
    cache_dir: str | None = None
    normaliser: NormaliserSamples | None = None  # given: subtract the estimated log Z(x) from every row

    @property
    def description(self) -> str:
        text = " + ".join(f"{weight:g} x logp({location})" for weight, location in self.terms)
        if self.normaliser is not None:
            samples = len(self.normaliser.responses[0]) if self.normaliser.responses else 0
            text += f" - log Z(x) (estimated from {samples} samples per prompt)"
        return text

    def __call__(self, run, datasets: dict, groups: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        recipe, accelerator = run.recipe, run.accelerator
        totals: dict[str, dict[str, torch.Tensor]] = {}
        samples = _tokenised_samples(run, self.normaliser) if self.normaliser is not None else None
        anchor_of_samples, sampler_of_samples = 0.0, None
        for weight, location in self.terms:
            model = freeze(load_causal_lm(location, recipe.model, run.dtype)).to(accelerator.device)
            if samples is not None:
                logps = _completion_logps(model, samples, run.tokenizer.pad_token_id, recipe.training.batch_size,
                                          accelerator.device, recipe.training.fused_logprobs)
                anchor_of_samples = anchor_of_samples + weight * logps
                if location == self.normaliser.sampled_from:
                    sampler_of_samples = logps
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
        if samples is not None:
            if sampler_of_samples is None:
                raise ValueError(f"APO: the samples come from {self.normaliser.sampled_from}, which is not one of "
                                 f"the anchor's checkpoints {[location for _, location in self.terms]}")
            log_z = _log_normaliser_by_prompt(samples, anchor_of_samples, sampler_of_samples)
            for split, dataset in datasets.items():
                missing = subtract_log_normaliser(totals[split], dataset["prompt_ids"], log_z, groups)
                if missing and accelerator.is_main_process:
                    print(f"APO anchor: {missing} of {len(dataset)} {split} rows have no sampled prompt to estimate "
                          f"log Z(x) from; their reference stays unnormalised (their loss values are shifted).",
                          flush=True)
        return totals


@dataclass(frozen=True)
class TokenisedSamples:
    prompt_ids: list[list[int]]      # one per kept response
    completion_ids: list[list[int]]
    prompt_of: list[int]             # index of each response's prompt in `NormaliserSamples.prompts`


def _tokenised_samples(run, normaliser: NormaliserSamples) -> TokenisedSamples:
    """Each sampled response tokenised exactly like a pair's completion (same template, truncation and
    prompt ids), so a pair row finds its prompt's samples by its `prompt_ids`. Responses of prompts the
    tokenisation drops are left out."""
    import dataclasses

    from ..data.preference import tokenise_pair

    settings = dataclasses.replace(run.tokenisation, groups=("chosen", "rejected"), generate_template=None,
                                   revision_template=None)
    prompt_ids, completion_ids, prompt_of = [], [], []
    for index, (prompt, responses) in enumerate(zip(normaliser.prompts, normaliser.responses)):
        for text in responses:
            completion = text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            tokens = tokenise_pair({"prompt": prompt, "chosen": completion, "rejected": completion}, run.tokenizer,
                                   settings)
            if tokens["keep"]:
                prompt_ids.append(tokens["prompt_ids"])
                completion_ids.append(tokens["chosen_ids"])
                prompt_of.append(index)
    return TokenisedSamples(prompt_ids, completion_ids, prompt_of)


@torch.no_grad()
def _completion_logps(model, samples: TokenisedSamples, pad_id: int, batch_size: int, device,
                      fused: bool) -> torch.Tensor:
    """Summed completion log-probs of every sampled response under `model`, `[N]` float32 on the CPU."""
    from ..data.batching import pad_sequences
    from ..logprobs import sequence_logps

    sums = []
    for start in range(0, len(samples.prompt_ids), batch_size):
        batch = pad_sequences(samples.prompt_ids[start: start + batch_size],
                              samples.completion_ids[start: start + batch_size], pad_id)
        sums.append(sequence_logps(model, batch.to(device), fused=fused).sums.float().cpu())
    return torch.cat(sums) if sums else torch.zeros(0)


def _log_normaliser_by_prompt(samples: TokenisedSamples, anchor: torch.Tensor,
                              sampler: torch.Tensor) -> dict[tuple[int, ...], float]:
    """`log_normaliser_estimate` of each sampled prompt, keyed by its token ids."""
    members: dict[tuple[int, ...], list[int]] = {}
    for position, prompt_ids in enumerate(samples.prompt_ids):
        members.setdefault(tuple(prompt_ids), []).append(position)
    return {key: float(log_normaliser_estimate(anchor[positions], sampler[positions]))
            for key, positions in members.items()}


def subtract_log_normaliser(table: dict[str, torch.Tensor], prompt_ids, log_z: dict[tuple[int, ...], float],
                            groups: list[str]) -> int:
    """Subtract `log Z(x)` from the reference log-probs of every row whose prompt has an estimate, in every group
    that continues the plain prompt (chosen, rejected, gold); returns how many rows had none."""
    from ..data.batching import GROUP_COLUMNS

    shift = torch.tensor([log_z.get(tuple(ids), math.nan) for ids in prompt_ids], dtype=torch.float64)
    known = ~torch.isnan(shift)
    for name in groups:
        if GROUP_COLUMNS[name][0] == "prompt_ids" and name in table:
            values = table[name]
            table[name] = torch.where(known, values.double() - torch.nan_to_num(shift), values.double()).to(values.dtype)
    return int((~known).sum())


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


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x on (`past_key_values` is deprecated
    there and goes in 5.40), `past_key_values` before."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


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
                               **{_cache_argument(self.previous): self.cache}, use_cache=True)
        cache = output.cache if hasattr(output, "cache") else output.past_key_values
        self.cache, self.attention_mask, self.seen = cache, mask, input_ids.shape[1]
        return output.logits[:, -1, :]

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        previous = self._forward(input_ids).float()
        vocabulary = min(scores.shape[-1], previous.shape[-1])
        combined = scores.float().clone()
        combined[:, :vocabulary] = (1.0 + self.alpha) * combined[:, :vocabulary] - self.alpha * previous[:, :vocabulary]
        return combined.to(scores.dtype)


@dataclass(frozen=True)
class ExtrapolatedLogitsFactory:
    """For `generation.generate(..., processor_factory=...)`: a fresh `ExtrapolatedLogits` per `generate` batch,
    its prompt mask repeated like `generate` repeats the prompts for several samples each; on the fast path
    (`fast_partner`) the previous model is decoded in step with the current one instead
    (`fast_generation.fast_generate(extrapolation=...)`, the same logits)."""

    previous: torch.nn.Module
    alpha: float

    def __call__(self, encoded, num_samples: int) -> ExtrapolatedLogits:
        mask = encoded["attention_mask"].repeat_interleave(num_samples, dim=0)
        return ExtrapolatedLogits(self.previous, self.alpha, mask)

    def fast_partner(self) -> tuple[torch.nn.Module, float]:
        return self.previous, self.alpha


def extrapolated_logits_factory(previous: torch.nn.Module, alpha: float) -> ExtrapolatedLogitsFactory:
    return ExtrapolatedLogitsFactory(previous, alpha)


def save_directory(model, tokenizer, target: Path) -> Path:
    """A model as a Hugging Face directory (for engines that load from disk, vLLM)."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
