"""Batched generation with the model's chat template (transformers `generate`, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import unwrap


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16


def render_prompts(tokenizer, prompts: list, system_prompt: str | None = None) -> list[str]:
    """Prompt texts ready for generation: chat template with the generation prompt for message lists."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(prompt)
            continue
        messages = list(prompt)
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


@torch.no_grad()
def generate(model, tokenizer, prompts: list, settings: SamplingSettings, system_prompt: str | None = None,
             processor_factory=None) -> list[list[str]]:
    """For each prompt, `num_samples` completions (decoded, special tokens removed). `processor_factory`,
    called as `(encoded_batch, num_samples)` once per batch, makes a logits processor holding that batch's
    state (APO's extrapolated logits run a second model with its own KV cache)."""
    from transformers import LogitsProcessorList

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
