"""Sampling for the iterative methods: K responses per prompt from a policy that is one checkpoint, or APO's
extrapolation of two, through the shared generation engine (`align_cli.engine`: vLLM when it is installed
and a GPU is present, transformers `generate` otherwise; the same output format either way).
APO's `extrapolated_logits` needs both models at every decoding step, which vLLM's sampler cannot run, so it
always takes the transformers path; the run records which engine served each iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import Engine, TransformersEngine, VLLMEngine, choose_engine
from ..generation import SamplingSettings
from ..models import load_for_inference, resolve_model_location
from .extrapolation import extrapolated_logits_factory, extrapolated_weights, save_directory

SAMPLE_FROM = ("extrapolated_logits", "extrapolated_weights", "policy")


@dataclass(frozen=True)
class Sampler:
    """Which policy to sample: `current` (pihat_t), or its extrapolation with `previous` (pihat_{t-1})."""

    current: str
    previous: str | None = None
    alpha: float = 0.0
    sample_from: str = "policy"

    @property
    def mode(self) -> str:
        """What actually runs: without a previous checkpoint or momentum every mode is the policy itself."""
        return "policy" if self.previous is None or self.alpha == 0 else self.sample_from


def _policy_model(sampler: Sampler, model_config, dtype) -> torch.nn.Module:
    model = load_for_inference(sampler.current, model_config, dtype)
    if sampler.mode == "extrapolated_weights":
        previous = load_for_inference(sampler.previous, model_config, dtype)
        extrapolated_weights(model, previous, sampler.alpha)
        del previous
    return model


def sampler_engine(sampler: Sampler, tokenizer, *, model_config, dtype, system_prompt: str | None, engine: str,
                   seed: int, workdir: Path) -> Engine:
    """The shared engine (`align_cli.engine`) serving this sampler's policy."""
    mode = sampler.mode
    if choose_engine(engine, needs_transformers=mode == "extrapolated_logits") == "vllm":
        location = sampler.current
        if mode == "extrapolated_weights":  # vLLM loads from disk: write the extrapolated weights once
            location = str(save_directory(_policy_model(sampler, model_config, dtype), tokenizer, workdir / "sampler_model"))
        return VLLMEngine(resolve_model_location(location), tokenizer, dtype, system_prompt, seed=seed)
    factory = None
    if mode == "extrapolated_logits":
        factory = extrapolated_logits_factory(load_for_inference(sampler.previous, model_config, dtype), sampler.alpha)
    return TransformersEngine(_policy_model(sampler, model_config, dtype), tokenizer, system_prompt, factory)


def sample_responses(sampler: Sampler, tokenizer, prompts: list, settings: SamplingSettings, *, model_config, dtype,
                     system_prompt: str | None = None, engine: str = "auto", workdir: Path | None = None):
    """`settings.num_samples` responses for each prompt, and a record of how they were made."""
    served_by = sampler_engine(sampler, tokenizer, model_config=model_config, dtype=dtype, system_prompt=system_prompt,
                               engine=engine, seed=settings.seed, workdir=workdir or Path("."))
    try:
        responses = served_by.generate(prompts, settings)
    finally:
        served_by.close()
    return responses, {"engine": served_by.name, "sample_from": sampler.mode}
