"""Batched generation with the model's chat template (transformers `generate`, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.render import render_prompts
from .models import unwrap


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16


def instruction_prompt(prompt, raw: bool = False):
    """The one rule of `align generate` and `align eval` for what the model is asked: an instruction string
    becomes one user message, so that the chat template (and system prompt) frames it as an instruct model was
    tuned on; with `raw` (a base model, or prompts already formatted) the string is sent as it is. Chat
    messages always go through the chat template."""
    if isinstance(prompt, str):
        return prompt if raw else [{"role": "user", "content": prompt}]
    return list(prompt)


def generation_stop_ids(model) -> set[int]:
    """The tokens `generate` stops a row at: the generation config's end-of-sequence ids."""
    configured = getattr(unwrap(model).generation_config, "eos_token_id", None)
    return set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])


@dataclass
class Decoded:
    """What `decode` sampled: `num_samples` completions per prompt, prompt-major (completion i answers prompt
    i // num_samples), as token ids."""

    prompt_ids: list[list[int]]       # one per prompt, as tokenised (no padding)
    completion_ids: list[list[int]]   # up to and including the first stop token, or max_new_tokens long
    stopped: list[bool]               # ended on a stop token (False: reached max_new_tokens)
    # Fast path: per completion token, its log-prob under softmax(z / T) as the sampler computed it.
    sampler_logps: list[list[float]] | None = None
    # A logits processor with `take_records()` (HAPO's adaptive temperature): per completion, its per-token
    # (factor, entropy) rows, cut to the completion's length.
    records: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def cut_at_stop(tokens: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first stop token, and whether it had one."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1], True
    return tokens, False


@torch.no_grad()
def decode(model, tokenizer, texts: list[str], settings: SamplingSettings, stops: set[int], *,
           processor_for=None, logits_processor=None, fast: bool | None = None) -> Decoded:
    """The one decode loop of every generating caller (`generate` for text, `rl.rollout.generate_rollouts` for
    token ids): `settings.num_samples` completions of each rendered prompt text, greedy at temperature 0.

    `fast` (None: `fast_generation.wanted`, the default on CUDA): every prompt x sample in one
    `fast_generation.fast_generate` call, continuous batching, seeds per (seed, prompt index, sample index).
    Otherwise (and where `fast_generation.blocker` names a reason, e.g. a processor without a fast-path
    equivalent) transformers `generate` in batches of `batch_size` prompts, seeded per batch. `processor_for(encoded_batch, num_samples)`, called once per batch, gives that batch's logits
    processor (APO's extrapolated logits hold a second model's KV cache). `logits_processor`: one processor for
    every batch (HAPO's adaptive temperature, which records per row). Both have fast-path equivalents
    (`fast_partner()`, `fast_sampling()`), so neither holds the call on the slow path."""
    from transformers import LogitsProcessorList

    from . import fast_generation

    if logits_processor is not None:
        if processor_for is not None:
            raise ValueError("decode takes a processor_for or a logits_processor, not both")
        processor_for = lambda _encoded, _num_samples: logits_processor  # noqa: E731
    processors = [p for p in (logits_processor if logits_processor is not None else processor_for,) if p is not None]
    if fast is None:
        fast = fast_generation.wanted(model, processors)
    if fast and fast_generation.blocker(model, processors) is None:
        return _decode_fast(model, tokenizer, texts, settings, stops, processors[0] if processors else None)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    records = hasattr(logits_processor, "take_records")  # HAPO's processor records per `generate` row
    decoded = Decoded([], [], [], records=[] if records else None)
    sampling = settings.temperature > 0
    try:
        for start in range(0, len(texts), settings.batch_size):
            encoded = tokenizer(texts[start: start + settings.batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            if sampling:
                torch.manual_seed(settings.seed + start)
            processor = processor_for(encoded, settings.num_samples) if processor_for is not None else None
            generated = model.generate(
                **encoded, max_new_tokens=settings.max_new_tokens, do_sample=sampling,
                temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
                top_k=None, num_return_sequences=settings.num_samples, pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([processor] if processor is not None else []),
            )
            mask = encoded["attention_mask"].bool()
            decoded.prompt_ids.extend(ids[row_mask].tolist() for ids, row_mask in zip(encoded["input_ids"], mask))
            factors, entropies = processor.take_records() if records else (None, None)
            for index, sequence in enumerate(generated[:, encoded["input_ids"].shape[1]:].tolist()):
                completion, stopped = cut_at_stop(sequence, stops)
                decoded.completion_ids.append(completion)
                decoded.stopped.append(stopped)
                if factors is not None:
                    decoded.records.append((factors[index, : len(completion)], entropies[index, : len(completion)]))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return decoded


def _decode_fast(model, tokenizer, texts: list[str], settings: SamplingSettings, stops: set[int],
                 processor=None) -> Decoded:
    from .fast_generation import Sampling, fast_generate

    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    adaptive = processor.fast_sampling() if callable(getattr(processor, "fast_sampling", None)) else None
    extrapolation = processor.fast_partner() if callable(getattr(processor, "fast_partner", None)) else None
    sampling = Sampling(settings.temperature, settings.top_p if settings.temperature > 0 else 1.0, settings.seed,
                        adaptive)
    out = fast_generate(model, prompt_ids, settings.num_samples, settings.max_new_tokens, sampling, stops,
                        extrapolation=extrapolation)
    records = None
    if out.temperature_factors is not None:
        processor.count_factors(out.temperature_factors)
        records = [(torch.tensor(f), torch.tensor(e)) for f, e in zip(out.temperature_factors, out.entropies)]
    return Decoded(prompt_ids, out.tokens, list(out.stopped), sampler_logps=out.tempered_logps, records=records)


def generate(model, tokenizer, prompts: list, settings: SamplingSettings, system_prompt: str | None = None,
             processor_factory=None, fast: bool | None = None) -> list[list[str]]:
    """For each prompt, `num_samples` completions (decoded, special tokens removed), through `decode`: chat
    template for message lists, the generation config's end-of-sequence ids as stops. `processor_factory`
    is `decode`'s `processor_for`; `fast` as there."""
    decoded = decode(model, tokenizer, render_prompts(tokenizer, prompts, system_prompt), settings,
                     generation_stop_ids(model), processor_for=processor_factory, fast=fast)
    completions = tokenizer.batch_decode(decoded.completion_ids, skip_special_tokens=True)
    n = settings.num_samples
    return [completions[index * n:(index + 1) * n] for index in range(len(prompts))]
