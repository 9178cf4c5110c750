"""Everything a run needs before its first step: run directory, Accelerator, tokenizer, data, models."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import remove_tree
from .chunked_mlp import chunk_mlps
from .compilation import compile_decision, compile_layers
from .config import DataSource, ModelConfig, Recipe, TrainingConfig
from .data.packing import check_packing_settings, packing_enabled
from .data.preference import TokenisationSettings, normalise_rows, tokenise_preferences
from .data.sources import load_source
from .distributed import engine_name, merge_lora_state_dict, shards_parameters
from .errors import UserError
from .liger_kernels import liger_decision, use_liger_kernels
from .models import apply_lora, freeze, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_location, unwrap
from .reference_offload import HostResidentWeights
from .run_dir import begin_writing, resolve_run_dir


@dataclass
class RunInputs:
    recipe: Recipe
    run_dir: Path
    accelerator: object
    tokenizer: object
    tokenisation: TokenisationSettings
    train_data: object
    eval_data: object
    data_report: dict
    policy: torch.nn.Module
    reference_model: torch.nn.Module | None
    reference_context: Callable
    reference_location: str
    dtype: torch.dtype
    task_rows: list[dict]
    # `training.compile`: whether the layers were compiled and why (compilation.compile_decision), and the
    # CompiledLayers of the policy (and live reference) when they were.
    compilation: dict | None = None
    chunked_mlps: int = 0  # `training.mlp_chunk_tokens`: how many decoder MLPs run in chunks (chunked_mlp.py)
    reference_weights: HostResidentWeights | None = None  # `reference.offload` (reference_offload.py)
    liger_kernels: dict | None = None  # `training.liger_kernels`: liger_setting's report, with what was changed

    def memory_report(self) -> dict:
        """summary.json's `memory` keys of the MLP chunking and the reference's offload (the pairwise trainer adds
        its levers)."""
        offloaded = self.reference_weights.bytes if self.reference_weights is not None else 0
        return {"mlp_chunk_tokens": self.recipe.training.mlp_chunk_tokens, "chunked_mlps": self.chunked_mlps,
                "reference_offloaded_bytes": offloaded}

    def compile_report(self) -> dict | None:
        """summary.json's `compile`: enabled, why, backend, and the error a fallback to eager came from."""
        if self.compilation is None:
            return None
        report = {"enabled": self.compilation["enabled"], "why": self.compilation["why"]}
        for name in ("policy", "reference"):
            if self.compilation.get(name) is not None:
                report[name] = self.compilation[name].report()
        return report

    def save_final_model(self, model) -> Path:
        """The trained model as a plain Hugging Face directory (LoRA merged on request), written atomically."""
        accelerator = self.accelerator
        target = self.run_dir / "final_model"
        state_dict = accelerator.get_state_dict(model)  # gathered to the main process under FSDP2 / ZeRO-3
        if accelerator.is_main_process:
            inner = accelerator.unwrap_model(model)
            staging = Path(tempfile.mkdtemp(prefix=".final_model.", dir=self.run_dir))
            if self.recipe.peft.enabled and self.recipe.peft.merge_on_save:
                if shards_parameters(accelerator):  # the live modules hold shards: merge the gathered weights
                    lora = self.recipe.peft
                    state_dict = merge_lora_state_dict(state_dict, lora.alpha / lora.r)
                    inner = inner.get_base_model()
                else:
                    inner = inner.merge_and_unload()
                    state_dict = None
            inner.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            remove_tree(target)
            os.replace(staging, target)
        accelerator.wait_for_everyone()
        return target


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator, DataLoaderConfiguration

    precision = recipe.training.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # split_batches: no data loader is prepared (DataOrder gives each process its rows), and with it the
    # prepared LR scheduler advances once per optimiser step, not once per process.
    return Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
                       gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def load_preference_split(source: DataSource, tokenizer, settings: TokenisationSettings, num_proc):
    dataset = load_source(source.source, source.split, source.subset)
    dataset = normalise_rows(dataset, source)  # column mapping, or rated responses -> triples
    if source.max_rows:
        dataset = dataset.select(range(min(source.max_rows, len(dataset))))
    return dataset


def load_data(recipe: Recipe, tokenizer, settings: TokenisationSettings):
    data = recipe.data
    train_raw = load_preference_split(data.train, tokenizer, settings, data.num_proc)
    if data.eval is not None:
        eval_raw = load_preference_split(data.eval, tokenizer, settings, data.num_proc)
    else:
        if data.eval_fraction == 0 or len(train_raw) < 2:
            raise UserError("No held-out data: set data.eval (a source) or data.eval_fraction > 0.")
        split = train_raw.train_test_split(test_size=data.eval_fraction, seed=data.shuffle_seed)
        train_raw, eval_raw = split["train"], split["test"]
    if data.max_eval_rows:
        eval_raw = eval_raw.select(range(min(data.max_eval_rows, len(eval_raw))))
    train, train_report = tokenise_preferences(train_raw, tokenizer, settings, data.train.source, data.num_proc)
    evaluation, eval_report = tokenise_preferences(eval_raw, tokenizer, settings,
                                                   (data.eval or data.train).source, data.num_proc)
    report = {"train": train_report, "eval": eval_report}
    for split, counts in report.items():
        if counts["dropped_long_prompts"] or counts["truncated_completions"]:
            warnings.warn(f"{split} data: dropped {counts['dropped_long_prompts']} of {counts['rows']} rows whose prompt "
                          f"exceeds data.max_prompt_length, cut {counts['truncated_completions']} completions to "
                          f"data.max_length.", stacklevel=2)
    return train, evaluation, report


def load_task_rows(recipe: Recipe) -> list[dict]:
    evaluation = recipe.evaluation
    if evaluation.task is None:
        return []
    dataset = load_source(evaluation.prompts, evaluation.split)
    if "answer" not in dataset.column_names or "prompt" not in dataset.column_names:
        raise UserError(f"evaluation.prompts '{evaluation.prompts}' needs 'prompt' and 'answer' columns; "
                        f"found {', '.join(dataset.column_names)}.")
    return [dataset[i] for i in range(min(evaluation.num_prompts, len(dataset)))]


def start_run(recipe: Recipe, recipe_path: Path | None, output_dir: str | None, resume: bool, overwrite: bool,
              allow_recipe_change: bool = False):
    """What every trainer does first: threads, the run directory (locked; see `run_dir`), the Accelerator,
    the seed and the tokenizer. The trainer calls `run_dir.begin_writing` once its inputs are loaded: only then
    is an --overwrite's old run moved aside and recipe.yaml written."""
    from accelerate.utils import set_seed

    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    run_dir = resolve_run_dir(recipe, recipe_path, output_dir, resume, overwrite, allow_recipe_change)
    accelerator = make_accelerator(recipe)
    set_seed(recipe.training.seed)
    return run_dir, accelerator, load_tokenizer(recipe.model, recipe.data.chat_template)


def prepare_run(recipe: Recipe, recipe_path: Path | None, output_dir: str | None, resume: bool, overwrite: bool,
                needs_reference: bool = True, groups: list[str] | None = None,
                allow_recipe_change: bool = False) -> RunInputs:
    """`groups`: the sequence groups the losses need (Objective.policy_groups); only their columns are tokenised."""
    run_dir, accelerator, tokenizer = start_run(recipe, recipe_path, output_dir, resume, overwrite,
                                                allow_recipe_change)
    settings = TokenisationSettings.from_recipe(recipe, groups or ("chosen", "rejected"))
    with accelerator.main_process_first():
        train_data, eval_data, report = load_data(recipe, tokenizer, settings)
    dtype = resolve_dtype(recipe.model.dtype)
    check_packing_settings(recipe.training)
    model_config = model_config_for(recipe.model, recipe.training)  # attention backend for packed rows
    policy = load_causal_lm(recipe.model.name, model_config, dtype)
    compiled, why = compile_decision(recipe.training.compile, device_type=accelerator.device.type,
                                     engine=engine_name(accelerator))
    liger = liger_setting(recipe.training, accelerator, policy, compiled)
    chunked = prepare_for_backward(policy, recipe.training, liger)
    reference_name = recipe.reference.name
    reference_model, context = None, contextlib.nullcontext
    if recipe.peft.enabled:
        policy = apply_lora(policy, recipe.peft)
        if reference_name is None:
            reference_model, context = policy, unwrap(policy).disable_adapter
    compilation = {"enabled": compiled, "why": why, "policy": compile_layers(policy) if compiled else None}
    reference_weights = None
    if reference_model is None and needs_reference:
        reference_model = freeze(load_causal_lm(reference_name or recipe.model.name, model_config, dtype))
        if liger["enabled"]:
            use_liger_kernels(reference_model)
        if compiled and not recipe.reference.precompute:  # a precomputed reference runs once: not worth it
            compilation["reference"] = compile_layers(reference_model)
        if recipe.reference.offload:  # in host memory, on the device for each forward (reference_offload.py)
            reference_weights = offload_reference(accelerator, reference_model)
            context = reference_weights.resident
        elif not shards_parameters(accelerator):  # else sharded after the policy (distributed.prepare_reference)
            reference_model.to(accelerator.device)
    run = RunInputs(recipe, run_dir, accelerator, tokenizer, settings, train_data, eval_data, report, policy,
                    reference_model, context, resolve_model_location(reference_name or recipe.model.name), dtype,
                    load_task_rows(recipe), compilation, chunked, reference_weights, liger)
    begin_writing(run_dir)  # everything loaded: an --overwrite's old run moves aside only now
    return run


def offload_reference(accelerator, reference_model) -> HostResidentWeights:
    """`reference.offload` (both trainers): the reference's weights moved to host memory. Under FSDP / ZeRO-3 it is
    refused before anything is written (the engine shards the reference with the policy, so no process holds a
    whole copy to keep in host memory)."""
    if shards_parameters(accelerator):
        raise UserError(f"reference.offload keeps a whole reference model in host memory, but under "
                        f"{engine_name(accelerator)} the reference is sharded with the policy. Set "
                        f"reference.offload: false (the shards already spread it), or launch without FSDP / ZeRO-3.")
    return HostResidentWeights(reference_model, accelerator.device)


def liger_setting(training: TrainingConfig, accelerator, policy, compiled: bool) -> dict:
    """`training.liger_kernels` decided for this run (liger_kernels.liger_decision; true where the kernels cannot
    run is refused here, before anything is written): summary.json's `liger_kernels`, which `prepare_for_backward`
    completes with what it changed."""
    enabled, why = liger_decision(training.liger_kernels, device_type=accelerator.device.type, compiled=compiled,
                                  model_type=getattr(unwrap(policy).config, "model_type", None))
    return {"enabled": enabled, "why": why}


def prepare_for_backward(policy, training: TrainingConfig, liger: dict | None = None) -> int:
    """The policy's activation checkpointing (non-reentrant, per decoder layer), Liger's fused kernels when
    `liger` (liger_setting's report) has them on, and MLP chunking (around the fused MLP), as `training` asks;
    returns how many MLPs run in chunks."""
    if training.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if liger is not None and liger["enabled"]:
        liger.update(use_liger_kernels(policy))
    return chunk_mlps(policy, training.mlp_chunk_tokens)


def model_config_for(model: ModelConfig, training: TrainingConfig) -> ModelConfig:
    """The model settings to load with: packing on CUDA without a chosen backend takes `align_packed`
    (per batch FlexAttention, flash varlen or the padded batch on packed rows, by measured cost; SDPA on padded batches and in
    generation; align_cli/packed_attention.py)."""
    from .packed_attention import ALIGN_BACKENDS, register_backend

    if model.attn_implementation is None and packing_enabled(training) and torch.cuda.is_available():
        return model.model_copy(update={"attn_implementation": register_backend()})
    if model.attn_implementation in ALIGN_BACKENDS:
        register_backend()
    return model

