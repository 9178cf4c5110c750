"""The generation engine every generating command shares: APO and Curry-DPO sampling, `align generate`
(SRPO self-revision), `align eval` answers and the task evaluation of a run.

Two backends, one interface (`engine.generate(prompts, settings)` -> for each prompt, its
`settings.num_samples` decoded completions, special tokens removed):
- `TransformersEngine`: `generation.generate` around a model already in memory (the live policy of a run)
  or loaded from a directory: on CUDA the fast path (`align_cli.fast_generation`: all prompts x samples in
  one call, continuous batching over preallocated KV slots, a CUDA-graph decode step), elsewhere and for
  what that path cannot run (APO's processor factory, sharded weights, ...) transformers `generate` with the
  KV cache (docs/generation.md);
- `VLLMEngine`: vLLM, when it is installed and a CUDA GPU is present (`engine: auto` picks it, `vllm`
  insists), from a model directory.
Both render prompts with the same chat template (`generation.render_prompts`) and hand vLLM token ids, so
the two see identical inputs. Online RL keeps the transformers backend: its rollouts need the policy's
weights of every step (the fast path samples the live module itself), and moving them into a vLLM engine each
step is not implemented.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Protocol

import torch

from .data.render import render_prompts
from .errors import UserError
from .generation import SamplingSettings, generate

ENGINES = ("auto", "transformers", "vllm")


class Engine(Protocol):
    name: str

    def generate(self, prompts: list, settings: SamplingSettings) -> list[list[str]]: ...

    def close(self) -> None: ...


def vllm_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str, needs_transformers: bool = False) -> str:
    """The backend that serves a request for `requested` (auto | transformers | vllm). `needs_transformers`:
    the caller steers every decoding step itself (APO's extrapolated logits), which vLLM cannot run."""
    if requested not in ENGINES:
        raise UserError(f"Unknown generation engine '{requested}'; use one of {', '.join(ENGINES)}.")
    if requested == "vllm" and not vllm_usable():
        raise UserError("Generation engine vllm needs the vllm package and a CUDA GPU; use auto or transformers.")
    if needs_transformers:
        return "transformers"
    if requested == "vllm" or (requested == "auto" and vllm_usable()):
        return "vllm"
    return "transformers"


class TransformersEngine:
    name = "transformers"

    def __init__(self, model, tokenizer, system_prompt: str | None = None, processor_factory=None):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.processor_factory = processor_factory

    def generate(self, prompts: list, settings: SamplingSettings) -> list[list[str]]:
        return generate(self.model, self.tokenizer, prompts, settings, self.system_prompt, self.processor_factory)

    def close(self) -> None:
        self.model = None
        gc.collect()


class VLLMEngine:
    name = "vllm"

    def __init__(self, location: str, tokenizer, dtype: torch.dtype, system_prompt: str | None = None,
                 gpu_memory_utilization: float = 0.4, seed: int = 0):
        from vllm import LLM

        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        # 0.4 of the GPU by default: the iterative methods train on the same GPU right after sampling
        self.llm = LLM(model=location, seed=seed, dtype=str(dtype).replace("torch.", ""),
                       gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: list, settings: SamplingSettings) -> list[list[str]]:
        from vllm import SamplingParams

        # Token ids, not text: the rendered chat template already holds its special tokens, as on the other path.
        encoded = [{"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
                   for text in render_prompts(self.tokenizer, prompts, self.system_prompt)]
        params = SamplingParams(n=settings.num_samples, temperature=settings.temperature,
                                top_p=settings.top_p if settings.temperature > 0 else 1.0,
                                max_tokens=settings.max_new_tokens, seed=settings.seed)
        return [[completion.text for completion in output.outputs] for output in self.llm.generate(encoded, params)]

    def close(self) -> None:
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()


def open_engine(location: str, tokenizer, model_config, dtype: torch.dtype, requested: str = "auto",
                system_prompt: str | None = None, seed: int = 0) -> Engine:
    """An engine over the model saved at `location` (a directory, or builtin:NAME / a hub id for transformers)."""
    from .models import load_for_inference, resolve_model_location

    if choose_engine(requested) == "vllm":
        return VLLMEngine(resolve_model_location(location), tokenizer, dtype, system_prompt, seed=seed)
    return TransformersEngine(load_for_inference(location, model_config, dtype), tokenizer, system_prompt)
