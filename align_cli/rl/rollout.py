"""Rollouts: G sampled completions per prompt, kept as token ids, and their per-token scores.

Completions are kept as the exact token ids the policy sampled (decoding and re-tokenising would not give
them back). A completion ends at its first end-of-sequence token, which is kept and trained like any
other token; one that reaches `max_new_tokens` without it is marked truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batching import pad_sequences
from ..data.render import render_prompts
from ..generation import SamplingSettings, decode
from ..logprobs import sequence_logps
from ..models import unwrap


@dataclass
class Rollouts:
    """N = P * G completions, grouped: completion i belongs to prompt `group[i]` (0..P-1)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: torch.Tensor   # [N] bool
    group: torch.Tensor       # [N] long
    rows: list[dict]          # the data row of each completion's prompt
    # With HAPO's adaptive temperature (`AdaptiveTemperature` recording), per completion token: the temperature
    # it was sampled at, and the entropy of the untempered distribution there. None: one temperature for all.
    temperatures: list[list[float]] | None = None
    sampling_entropies: list[list[float]] | None = None
    # Fast path (`fast_generation`): per completion token, its log-prob under softmax(z / T) as the sampler
    # computed it; the trainer's own pi_old scores of the same tokens should match (generation/logp_gap).
    sampler_logps: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.long)

    def select(self, indices) -> Rollouts:
        indices = [int(i) for i in indices]

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return Rollouts([self.prompt_ids[i] for i in indices], [self.completion_ids[i] for i in indices],
                        [self.texts[i] for i in indices], self.truncated[indices], self.group[indices],
                        [self.rows[i] for i in indices], pick(self.temperatures), pick(self.sampling_entropies),
                        pick(self.sampler_logps))

    @staticmethod
    def concatenate(parts: list[Rollouts]) -> Rollouts:
        """Rollouts of several rounds, group numbers made consecutive across them."""
        offset, groups = 0, []
        for part in parts:
            groups.append(part.group + offset)
            offset += int(part.group.max()) + 1 if len(part) else 0
        def joined(name):
            values = [getattr(r, name) for r in parts]
            return None if any(v is None for v in values) else [x for v in values for x in v]

        return Rollouts([p for r in parts for p in r.prompt_ids], [c for r in parts for c in r.completion_ids],
                        [t for r in parts for t in r.texts], torch.cat([r.truncated for r in parts]),
                        torch.cat(groups), [row for r in parts for row in r.rows], joined("temperatures"),
                        joined("sampling_entropies"), joined("sampler_logps"))


def stop_token_ids(model, tokenizer) -> set[int]:
    configured = getattr(unwrap(model).generation_config, "eos_token_id", None)
    stops = set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def generate_rollouts(model, tokenizer, rows: list[dict], num_generations: int, *, max_new_tokens: int,
                      temperature: float, top_p: float, seed: int, batch_size: int,
                      system_prompt: str | None = None, logits_processor=None, fast: bool | None = None) -> Rollouts:
    """`num_generations` sampled completions for each row's `prompt` (chat template applied to messages), through
    the one decode loop (`generation.decode`: the fast path by default on CUDA, transformers `generate` in batches
    of `batch_size` prompts otherwise). A `logits_processor` is HAPO's adaptive temperature: its per-token factors
    and untempered entropies come back as `temperatures` and `sampling_entropies`, from either path."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                num_samples=num_generations, seed=seed, batch_size=batch_size)
    texts = render_prompts(tokenizer, [row["prompt"] for row in rows], system_prompt)
    decoded = decode(model, tokenizer, texts, settings, stop_token_ids(model, tokenizer),
                     logits_processor=logits_processor, fast=fast)
    records = decoded.records
    return Rollouts(
        [ids for ids in decoded.prompt_ids for _ in range(num_generations)], decoded.completion_ids,
        tokenizer.batch_decode(decoded.completion_ids, skip_special_tokens=True),
        torch.tensor([not stopped for stopped in decoded.stopped], dtype=torch.bool),
        torch.arange(len(rows)).repeat_interleave(num_generations),
        [row for row in rows for _ in range(num_generations)],
        # generate's own warper divides by `temperature` after the processor's factor
        [(factors * temperature).tolist() for factors, _ in records] if records is not None else None,
        [entropies.tolist() for _, entropies in records] if records is not None else None,
        sampler_logps=decoded.sampler_logps,
    )


def completion_mask(lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """`[B, T]` float mask, 1 on the first `lengths[i]` positions of row i."""
    width = int(lengths.max()) if width is None else width
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).to(torch.float32)


def to_padded(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row-major per-token values `[sum(lengths)]` laid out as `[B, max(lengths)]`, zero-padded."""
    mask = completion_mask(lengths.to(flat.device)).bool()
    padded = flat.new_zeros(mask.shape)
    return padded.masked_scatter(mask, flat)


def scoring_temperature(rollouts: Rollouts, temperature: float, per_token: bool = True) -> float | torch.Tensor:
    """The temperature each completion token is scored at: the one it was sampled at, `[sum(lengths)]` in
    row-major order, when the rollouts recorded per-token temperatures (HAPO's adaptive temperature) and
    `per_token`; otherwise the sampling temperature `temperature` for every token."""
    if per_token and rollouts.temperatures is not None:
        return torch.tensor([t for row in rollouts.temperatures for t in row], dtype=torch.float32)
    return float(temperature)


def score(model, rollouts: Rollouts, pad_id: int, *, fused: bool, with_entropy: bool, temperature: float,
          per_token_temperature: bool = True):
    """Per-token log-probs `[B, T]` (and entropies, or None) of the completions under `model`; with grad if
    grad mode is on. Only completion positions reach the LM head (`sequence_logps`).

    Both are of the distribution the tokens were sampled from, `softmax(z / T)` (as TRL and verl score):
    `T = temperature`, the rollout's sampling temperature, or, where the rollouts recorded one per token
    (HAPO's adaptive temperature) and `per_token_temperature`, each token's own `T_base * (1 + tau * ht)`.
    Top-p truncation is not undone (nor is it in TRL or verl)."""
    batch = pad_sequences(rollouts.prompt_ids, rollouts.completion_ids, pad_id).to(next(model.parameters()).device)
    scored = sequence_logps(model, batch, fused=fused, with_entropy=with_entropy,
                            temperature=scoring_temperature(rollouts, temperature, per_token_temperature))
    lengths = rollouts.lengths.to(scored.token_logps.device)
    logps = to_padded(scored.token_logps, lengths)
    entropy = to_padded(scored.token_entropy.float(), lengths) if with_entropy else None
    return logps, entropy


@torch.no_grad()
def score_in_chunks(model, rollouts: Rollouts, pad_id: int, batch_size: int, *, fused: bool, with_entropy: bool,
                    temperature: float, context=None, per_token_temperature: bool = True):
    """`score` without grad over micro-batches of `batch_size`, padded to the longest completion."""
    import contextlib

    width = int(rollouts.lengths.max())
    logps, entropies = [], []
    with (context() if context is not None else contextlib.nullcontext()):
        for start in range(0, len(rollouts), batch_size):
            part = rollouts.select(range(start, min(start + batch_size, len(rollouts))))
            chunk_logps, chunk_entropy = score(model, part, pad_id, fused=fused, with_entropy=with_entropy,
                                               temperature=temperature, per_token_temperature=per_token_temperature)
            pad = width - chunk_logps.shape[1]
            logps.append(torch.nn.functional.pad(chunk_logps, (0, pad)))
            if with_entropy:
                entropies.append(torch.nn.functional.pad(chunk_entropy, (0, pad)))
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)
