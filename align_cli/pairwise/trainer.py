"""The offline pairwise trainer: every loss of the DPO family (and any pairwise loss in LOSSES).

The loop is plain and readable on purpose (torchtune's habit): build the pieces, then
`for step: for micro-batch: forward -> loss -> backward; clip; step; log; checkpoint`.
Iterative methods (APO, Curry-DPO) call `train` once per iteration or stage.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..activation_offload import ActivationOffload
from ..attention_choice import attention_report
from ..config import Recipe
from ..data.batching import DataOrder, collate_groups
from ..distributed import configure_engine, mark_sharded_for_generation, prepare_reference
from ..divergence import CollapseMonitor, DivergenceGuard, gradient_norm
from ..errors import UserError
from ..lifecycle import (
    StopFlag,
    end_optimiser_step,
    finish,
    measured_before,
    optimiser_and_schedule,
    resumed_state,
    timing,
    write_summary,
)
from ..measurements import task_accuracy
from ..methods import METHODS
from ..optimizer_in_backward import STEP_OUTCOME, refuse_engines
from ..profiling import RunStepProfile
from ..run_dir import holds_run_directory
from ..run_log import MetricsLog, progress_bar
from ..run_setup import RunInputs, prepare_run
from .heldout import evaluate_pairs
from .objective import Objective, objective_forward
from .reference import CachedReference, LiveReference, cache_key, cached_or_computed, model_identity
from .throughput import collate_for, data_order


def total_steps(recipe: Recipe, order: DataOrder) -> int:
    training = recipe.training
    if training.max_steps:
        return training.max_steps
    micro_batches = math.floor(training.num_epochs * order.batches_per_epoch)
    return max(1, micro_batches // training.gradient_accumulation_steps)


def build_reference(run: RunInputs, objective: Objective, train_rows: list[int], reference_logps=None):
    """The reference provider the objective needs: none, cached log-probs, or a live frozen model.
    With `reference.precompute`, log-probs of the train rows this run visits (and of all eval rows)
    come from the disk cache, computed first where missing. `reference_logps`, when given, computes them
    instead: `(run, {split: tokenised dataset}, groups) -> {split: {group: [rows] tensor}}` (APO's
    extrapolated anchor, `extrapolation.AnchorLogps`)."""
    if not objective.needs_reference:
        return None, {}
    if reference_logps is not None:
        tables = reference_logps(run, {"train": run.train_data, "eval": run.eval_data}, objective.reference_groups)
        return ({split: CachedReference(table) for split, table in tables.items()},
                {"reference": getattr(reference_logps, "description", "precomputed")})
    recipe, accelerator = run.recipe, run.accelerator
    live = LiveReference(run.reference_model, run.reference_context, recipe.training.fused_logprobs,
                         objective.reference_groups, collate_for(recipe.training, collate_groups),
                         run.reference_weights)
    if not recipe.reference.precompute:
        return live, {"reference": "live"}
    providers, computed = {}, {}
    for split, dataset, rows in (("train", run.train_data, train_rows),
                                 ("eval", run.eval_data, list(range(len(run.eval_data))))):
        key = cache_key(model_identity(run.reference_location), dataset._fingerprint,
                        {**run.tokenisation.key(), "dtype": str(run.dtype), "fused": recipe.training.fused_logprobs})
        providers[split], computed[split] = cached_or_computed(
            live, dataset, rows, run.tokenizer.pad_token_id, recipe.training.batch_size, accelerator.device, key,
            recipe.reference.cache_dir, accelerator.is_main_process)
    return providers, {"reference": "cached", "reference_rows_computed": computed}


def _mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each process logs the same numbers: the mean over all processes' micro-batches."""
    if accelerator.num_processes == 1:
        return metrics
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device), "mean")
    return dict(zip(names, values.tolist()))


def _reference_for(reference, split: str):
    return reference[split] if isinstance(reference, dict) else reference


def _measure(run: RunInputs, model, objective, reference) -> dict:
    recipe = run.recipe
    results = evaluate_pairs(model, _reference_for(reference, "eval"), objective, run.eval_data,
                             run.tokenizer.pad_token_id, recipe.training.batch_size, run.accelerator.device,
                             recipe.training.fused_logprobs)
    if run.task_rows:
        results.update(task_accuracy(model, run.tokenizer, run.task_rows, recipe.evaluation.max_new_tokens,
                                     recipe.evaluation.batch_size, recipe.data.system_prompt))
        if METHODS[recipe.method.name].revision_evaluation and recipe.method.srpo.revisions:
            from ..data.render import Templates
            from ..self_revision import revision_evaluation

            srpo = recipe.method.srpo
            results.update(revision_evaluation(model, run.tokenizer, run.task_rows, srpo.revisions,
                                               Templates.from_config(srpo), recipe.evaluation.max_new_tokens,
                                               recipe.evaluation.batch_size, recipe.data.system_prompt,
                                               srpo.draft_temperature, recipe.training.seed))
    return results


@holds_run_directory  # the run directory's lock and an --overwrite's old run, released / settled on exit
def train(recipe: Recipe, recipe_path: Path | None = None, output_dir: str | None = None, resume: bool = False,
          overwrite: bool = False, on_step_end: Callable[[int], None] | None = None, reference_logps=None,
          allow_recipe_change: bool = False) -> dict:
    """Run the recipe; return the run summary (also written to `summary.json`). `reference_logps`: see
    `build_reference` (iterative methods pass their anchor's log-probs; no reference model is loaded).
    `allow_recipe_change`: resume even when the recipe changed in keys that alter the training (`run_dir`)."""
    objective = Objective(recipe.method.losses)
    if recipe.training.optimizer_in_backward:
        refuse_engines()  # one process only: before anything is written
    run = prepare_run(recipe, recipe_path, output_dir, resume, overwrite,
                      objective.needs_reference and reference_logps is None,
                      objective.policy_groups, allow_recipe_change)
    accelerator, training = run.accelerator, recipe.training
    order = data_order(training, run.train_data, objective.policy_groups, accelerator.num_processes,
                       accelerator.process_index)
    if not training.shuffle:  # the data's own order: a curriculum (Curry-DPO's single stage)
        order = dataclasses.replace(order, shuffle=False)
    collate = collate_for(training, collate_groups)  # packed rows, or padded ones
    if order.batches_per_epoch == 0:
        raise UserError(f"The training data has {len(run.train_data)} rows, fewer than one global batch "
                        f"({training.batch_size} x {accelerator.num_processes} processes). Lower training.batch_size.")
    steps = total_steps(recipe, order)

    model = run.policy
    optimizer, scheduler = optimiser_and_schedule(model, training, steps)
    in_backward = optimizer if training.optimizer_in_backward else None  # AdamWInBackward: steps inside backward
    configure_engine(accelerator, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    mark_sharded_for_generation(accelerator, model)
    # The reference is sharded like the policy (FSDP2, ZeRO-3), so it is prepared after it.
    run.reference_model, run.reference_context = prepare_reference(accelerator, run.reference_model, run.policy,
                                                                   run.reference_context)
    # Rows of every process's micro-batches: precomputed reference log-probs are shared by all processes.
    visited = sorted({row for rank in range(accelerator.num_processes)
                      for k in range(steps * training.gradient_accumulation_steps)
                      for row in dataclasses.replace(order, rank=rank).batch(k)})
    reference, reference_info = build_reference(run, objective, visited, reference_logps)
    if recipe.reference.precompute and run.reference_model is not run.policy:
        run.reference_model = None  # cached log-probs replace it: free its memory

    state = resumed_state(accelerator, run.run_dir, resume, {"step": 0, "micro_batch": 0, "tokens": 0, "seconds": 0.0})
    before = measured_before(run, lambda: _measure(run, model, objective, reference), "data")

    guard = DivergenceGuard(accelerator, run.run_dir, model)
    monitor = CollapseMonitor(**state.get("collapse", {}))  # resumed with the checkpoint
    log = MetricsLog(run.run_dir, recipe.logging.tensorboard, accelerator.is_main_process)
    stop = StopFlag()
    stop.install()
    train_reference = _reference_for(reference, "train")
    offload = ActivationOffload(model) if training.offload_activations else None
    profiler = RunStepProfile(run.run_dir, recipe.logging.profile_step, accelerator.process_index)
    model.train()
    started = time.time()
    last_metrics: dict = {}
    try:
        with progress_bar(recipe.logging.progress and accelerator.is_main_process) as progress:
            task = progress.add_task(f"{recipe.method.name}", total=steps, completed=state["step"],
                                     loss=float("nan"), accuracy=float("nan"), tokens_per_second=0.0)
            while state["step"] < steps:
                step_started = time.time()
                profiler.begin(state["step"] + 1)
                step_tokens, step_metrics, step_norm = 0, [], None
                for _ in range(training.gradient_accumulation_steps):
                    rows = order.batch(state["micro_batch"])
                    batch = collate([run.train_data[i] for i in rows], objective.policy_groups,
                                    run.tokenizer.pad_token_id).to(accelerator.device)
                    with accelerator.accumulate(model):
                        loss, metrics, _ = objective_forward(model, batch, objective, train_reference,
                                                             training.fused_logprobs)
                        guard.check_loss(loss, state["step"] + 1, f" (micro-batch rows {rows[:8]}...)")
                        if in_backward is not None:  # the last micro-batch's backward steps each parameter
                            in_backward.begin_backward(stepping=accelerator.sync_gradients)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and in_backward is not None:  # stepped: its norm, once
                            step_norm = in_backward.end_backward()
                            guard.check_gradient_norm(step_norm, state["step"] + 1, float(loss.detach()), STEP_OUTCOME)
                        elif accelerator.sync_gradients:  # the norm of the accumulated gradient, before it is applied
                            step_norm = gradient_norm(accelerator, model.parameters(), training.max_grad_norm)
                            guard.check_gradient_norm(step_norm, state["step"] + 1, float(loss.detach()))
                        optimizer.step()  # AdamWInBackward: nothing left to do
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    state["micro_batch"] += 1
                    step_tokens += int(batch.sequences.attention_mask.sum())
                    step_metrics.append({"loss": float(loss.detach()), **metrics})
                state["step"] += 1
                profiler.end(state["step"])
                step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
                state["tokens"] += step_tokens
                elapsed = time.time() - step_started
                state["seconds"] += elapsed
                last_metrics = _mean_over_processes(accelerator, {
                    k: sum(m.get(k, 0.0) for m in step_metrics) / len(step_metrics) for k in step_metrics[-1]})
                last_metrics.update(learning_rate=scheduler.get_last_lr()[0], tokens_per_second=step_tokens / max(elapsed, 1e-9))
                if step_norm is not None:  # one norm per optimiser step (None: DeepSpeed, see `gradient_norm`)
                    last_metrics["grad_norm"] = step_norm
                monitor.observe(state["step"], last_metrics["loss"], step_norm, announce=accelerator.is_main_process)
                state["collapse"] = monitor.as_dict()
                if state["step"] % recipe.logging.every == 0 or state["step"] == steps:
                    log.log(state["step"], last_metrics)
                progress.update(task, completed=state["step"], loss=last_metrics["loss"],
                                accuracy=last_metrics.get("rewards/accuracies", float("nan")),
                                tokens_per_second=last_metrics["tokens_per_second"])
                if training.eval_every and state["step"] % training.eval_every == 0 and state["step"] < steps:
                    log.log(state["step"], evaluate_pairs(model, _reference_for(reference, "eval"), objective, run.eval_data,
                                                          run.tokenizer.pad_token_id, training.batch_size,
                                                          accelerator.device, training.fused_logprobs), prefix="eval")
                end_optimiser_step(accelerator, recipe, run.run_dir, state, steps, stop, on_step_end, guard=guard)
    finally:
        stop.restore()
        log.close()
        if in_backward is not None:
            in_backward.remove_hooks()
        if offload is not None:
            offload.remove()

    after, final_dir = finish(run, model, log, state["step"], lambda: _measure(run, model, objective, reference), "data")
    summary = {
        "recipe": str(recipe_path) if recipe_path else None,
        "method": recipe.method.name,
        "losses": [term.model_dump() for term in recipe.method.losses],
        "model": recipe.model.name,
        "steps": state["step"],
        "processes": accelerator.num_processes,
        "train_rows": len(run.train_data),
        "eval_rows": len(run.eval_data),
        "data_report": run.data_report,
        "train_tokens": state["tokens"],
        **timing(state, started),
        **reference_info,
        "final_train_metrics": last_metrics,
        "compile": run.compile_report(),
        "liger_kernels": run.liger_kernels,
        "attention": attention_report(),  # align_packed's measured backend per shape bucket (packed_attention.py)
        "memory": {"optimizer_in_backward": training.optimizer_in_backward,
                   "offloaded_activations": offload.report() if offload is not None else None,
                   **run.memory_report()},
        "before": before,
        "after": after,
        "final_model_dir": final_dir,
        "warnings": monitor.warnings,
    }
    return write_summary(run.run_dir, summary, accelerator.is_main_process)
