"""Batched generation with the model's chat template (transformers `generate`, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
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


def render_prompts(tokenizer, prompts: list, system_prompt: str | None = None) -> list[str]:
    """Prompt texts ready for generation: chat template with the generation prompt for message lists;
    strings as they are (see `instruction_prompt`)."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(prompt)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"The tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')!r} has no chat "
                            f"template, so chat prompts cannot be rendered: pass --raw (align generate, align eval) "
                            f"to send string prompts as plain text, or use a model with a chat template.")
        messages = list(prompt)
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def generation_stop_ids(model) -> set[int]:
    """The tokens `generate` stops a row at: the generation config's end-of-sequence ids."""
    configured = getattr(unwrap(model).generation_config, "eos_token_id", None)
    return set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])


def generate_fast(model, tokenizer, texts: list[str], settings: SamplingSettings) -> list[list[str]]:
    """`generate` through `align_cli.fast_generation`: every prompt x sample in one call, continuous batching;
    seeds reproducible per (seed, prompt index, sample index)."""
    from .fast_generation import Sampling, fast_generate

    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    sampling = Sampling(settings.temperature, settings.top_p if settings.temperature > 0 else 1.0, settings.seed)
    out = fast_generate(model, prompt_ids, settings.num_samples, settings.max_new_tokens, sampling,
                        generation_stop_ids(model))
    completions = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    n = settings.num_samples
    return [completions[index * n:(index + 1) * n] for index in range(len(texts))]


@torch.no_grad()
def generate(model, tokenizer, prompts: list, settings: SamplingSettings, system_prompt: str | None = None,
             processor_factory=None, fast: bool | None = None) -> list[list[str]]:
    """For each prompt, `num_samples` completions (decoded, special tokens removed). `processor_factory`,
    called as `(encoded_batch, num_samples)` once per batch, makes a logits processor holding that batch's
    state (APO's extrapolated logits run a second model with its own KV cache); such a caller keeps the
    transformers `generate` path. `fast` (None: `fast_generation.wanted`, the default on CUDA) takes
    `align_cli.fast_generation` instead of `generate` in batches of `batch_size` prompts."""
    from transformers import LogitsProcessorList

    from . import fast_generation

    if fast is None:
        fast = processor_factory is None and fast_generation.wanted(model)
    if fast and processor_factory is None and fast_generation.blocker(model) is None:
        return generate_fast(model, tokenizer, render_prompts(tokenizer, prompts, system_prompt), settings)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    texts = render_prompts(tokenizer, prompts, system_prompt)
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    outputs: list[list[str]] = []
    generator_seed = settings.seed
    try:
        for start in range(0, len(texts), settings.batch_size):
            chunk = texts[start: start + settings.batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = settings.temperature > 0
            if sampling:
                torch.manual_seed(generator_seed + start)
            generated = model.generate(
                **encoded, max_new_tokens=settings.max_new_tokens, do_sample=sampling,
                temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
                top_k=None, num_return_sequences=settings.num_samples, pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList(
                    [processor_factory(encoded, settings.num_samples)] if processor_factory else []),
            )
            completions = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            for index in range(len(chunk)):
                outputs.append(completions[index * settings.num_samples:(index + 1) * settings.num_samples])
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
