"""The generation engine of the iterative methods: K sampled responses per prompt from a policy that is one
checkpoint, or APO's extrapolation of two.

Two backends return the same format (for each prompt, its K decoded responses, special tokens removed):
- vLLM, when it is installed and a GPU is present (`engine: auto` picks it; `engine: vllm` insists);
- transformers `generate` with the KV cache (`align_cli.generation.generate`), everywhere else.
APO's `extrapolated_logits` needs both models at every decoding step, which vLLM's sampler cannot run, so it
always takes the transformers path; the run records which engine served each iteration.
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .extrapolation import extrapolated_logits_factory, extrapolated_weights, save_directory
from .generation import SamplingSettings, generate, render_prompts
from .models import freeze, load_causal_lm, resolve_model_location

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


def vllm_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str, mode: str) -> str:
    if requested == "vllm" and not vllm_usable():
        raise UserError("sampling engine vllm needs the vllm package and a CUDA GPU; use engine: auto or transformers.")
    if mode == "extrapolated_logits":
        return "transformers"  # two models per decoding step: not expressible in vLLM's sampler
    if requested == "vllm" or (requested == "auto" and vllm_usable()):
        return "vllm"
    return "transformers"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(location: str, model_config, dtype) -> torch.nn.Module:
    return freeze(load_causal_lm(location, model_config, dtype)).to(_device())


def _policy_model(sampler: Sampler, model_config, dtype) -> torch.nn.Module:
    model = _load(sampler.current, model_config, dtype)
    if sampler.mode == "extrapolated_weights":
        previous = _load(sampler.previous, model_config, dtype)
        extrapolated_weights(model, previous, sampler.alpha)
        del previous
    return model


def _sample_transformers(sampler, tokenizer, prompts, settings, system_prompt, model_config, dtype) -> list[list[str]]:
    model = _policy_model(sampler, model_config, dtype)
    factory = None
    if sampler.mode == "extrapolated_logits":
        factory = extrapolated_logits_factory(_load(sampler.previous, model_config, dtype), sampler.alpha)
    return generate(model, tokenizer, prompts, settings, system_prompt, processor_factory=factory)


def _sample_vllm(sampler, tokenizer, prompts, settings, system_prompt, model_config, dtype, workdir: Path):
    from vllm import LLM, SamplingParams

    location = resolve_model_location(sampler.current)
    if sampler.mode == "extrapolated_weights":  # vLLM loads from disk: write the extrapolated weights once
        location = str(save_directory(_policy_model(sampler, model_config, dtype), tokenizer, workdir / "sampler_model"))
    # Token ids, not text: the rendered chat template already holds its special tokens, as on the other path.
    encoded = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
               for text in render_prompts(tokenizer, prompts, system_prompt)]
    llm = LLM(model=location, seed=settings.seed, dtype=str(dtype).replace("torch.", ""),
              gpu_memory_utilization=0.4)  # leave the rest of the GPU to the trainer that runs next
    params = SamplingParams(n=settings.num_samples, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, seed=settings.seed)
    outputs = llm.generate(encoded, params)
    responses = [[completion.text for completion in output.outputs] for output in outputs]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return responses


def sample_responses(sampler: Sampler, tokenizer, prompts: list, settings: SamplingSettings, *, model_config, dtype,
                     system_prompt: str | None = None, engine: str = "auto", workdir: Path | None = None):
    """`settings.num_samples` responses for each prompt, and a record of how they were made."""
    chosen = choose_engine(engine, sampler.mode)
    if chosen == "vllm":
        responses = _sample_vllm(sampler, tokenizer, prompts, settings, system_prompt, model_config, dtype,
                                 workdir or Path("."))
    else:
        responses = _sample_transformers(sampler, tokenizer, prompts, settings, system_prompt, model_config, dtype)
    gc.collect()
    return responses, {"engine": chosen, "sample_from": sampler.mode}
