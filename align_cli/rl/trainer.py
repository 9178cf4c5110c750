"""The online RL trainer: GRPO / DAPO / GSPO, with D^3S down-sampling and HAPO token weighting.

One training step, top to bottom (docs/ALGORITHMS.md sections 7-9):

1. rollout: G completions for each of `prompts_per_step` prompts (HAPO: adaptive temperature from the
   previous step's entropy statistics); rewards; DAPO dynamic sampling drops groups with equal rewards and
   samples more prompts until the batch is full (or `max_sampling_rounds`);
2. advantages with all G rollouts (GRPO, or HAPO's token-level group average);
3. score the rollouts under pi_old (log-probs, and entropies when D^3S or HAPO need them) and the reference
   (KL); D^3S keeps max-variance rollout subsets and the top-K% tokens by |A|*H; truncated completions are
   masked when asked;
4. `passes` x `mini_batches` optimiser steps with the clipped objective (`update.optimise`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Recipe
from ..distributed import requested_sharding_engine
from ..divergence import CollapseMonitor, DivergenceGuard
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
from ..liger_kernels import use_liger_kernels
from ..losses import LOSSES, hyperparameters, tensor_inputs, used_inputs
from ..losses.d3s import d3s_schedule
from ..losses.hapo import EntropyStats, entropy_signal
from ..losses.rl import AGGREGATIONS
from ..measurements import task_accuracy
from ..models import apply_lora, freeze, load_causal_lm, resolve_dtype, resolve_model_location, unwrap
from ..profiling import RunStepProfile
from ..run_dir import begin_writing, holds_run_directory
from ..run_log import MetricsLog, progress_bar
from ..run_setup import RunInputs, liger_setting, load_task_rows, offload_reference, prepare_for_backward, start_run
from .advantages import Selection, advantages_of, d3s_selection, informative_groups
from .data import PromptOrder, load_prompt_rows
from .rewards import WeightedRewards, overlong_penalty
from .rollout import Rollouts, completion_mask, generate_rollouts, score_in_chunks
from .temperature import AdaptiveTemperature, sampling_statistics
from .update import TrainBatch, optimise


def prepare_rl_run(recipe: Recipe, recipe_path: Path | None, output_dir: str | None, resume: bool,
                   overwrite: bool, needs_reference: bool, allow_recipe_change: bool = False) -> RunInputs:
    """Run directory, Accelerator, tokenizer, prompts, policy (+ LoRA) and, for the KL term, the reference."""
    run_dir, accelerator, tokenizer = start_run(recipe, recipe_path, output_dir, resume, overwrite,
                                                allow_recipe_change)
    prompts, report = load_prompt_rows(recipe, tokenizer)
    dtype = resolve_dtype(recipe.model.dtype)
    policy = load_causal_lm(recipe.model.name, recipe.model, dtype)
    liger = liger_setting(recipe.training, accelerator, policy, compiled=False)  # its training forward: eager
    chunked = prepare_for_backward(policy, recipe.training, liger)
    reference_name, reference_model, context = recipe.reference.name, None, contextlib.nullcontext
    if recipe.peft.enabled:
        policy = apply_lora(policy, recipe.peft)
        if needs_reference and reference_name is None:
            reference_model, context = policy, unwrap(policy).disable_adapter
    reference_weights = None
    if needs_reference and reference_model is None:
        reference_model = freeze(load_causal_lm(reference_name or recipe.model.name, recipe.model, dtype))
        if liger["enabled"]:
            use_liger_kernels(reference_model)
        if recipe.reference.offload:  # on the device only while it scores a step's rollouts (reference_offload.py)
            reference_weights = offload_reference(accelerator, reference_model)
            context = reference_weights.resident
        else:
            reference_model.to(accelerator.device)
    run = RunInputs(recipe=recipe, run_dir=run_dir, accelerator=accelerator, tokenizer=tokenizer, tokenisation=None,
                    train_data=prompts, eval_data=None, data_report=report, policy=policy,
                    reference_model=reference_model, reference_context=context,
                    reference_location=resolve_model_location(reference_name or recipe.model.name), dtype=dtype,
                    task_rows=load_task_rows(recipe), chunked_mlps=chunked, reference_weights=reference_weights,
                    liger_kernels=liger)
    begin_writing(run_dir)  # everything loaded: an --overwrite's old run moves aside only now
    return run


def refuse_sharding_engines(recipe: Recipe) -> None:
    """The online loop runs on one process or under DDP only: it neither configures DeepSpeed nor places the
    reference or gathers sharded weights for generation (`distributed.configure_engine`, `prepare_reference`,
    `mark_sharded_for_generation` in the pairwise trainer). Refused before anything is written."""
    engine = requested_sharding_engine()
    if engine is not None:
        raise UserError(f"method {recipe.method.name} (online RL) does not run under {engine}: its rollout loop "
                        f"does not set up sharded engines. Launch it on one process or with DDP "
                        f"(--accelerate-config ddp); FSDP2 and DeepSpeed ZeRO serve the pairwise and iterative "
                        f"methods.")


def refuse_pairwise_memory_keys(recipe: Recipe) -> None:
    """`training.optimizer_in_backward` and `training.offload_activations` serve the pairwise trainer (and the
    iterative loops around it); the online loop's passes over mini-batches step and clip on their own."""
    training = recipe.training
    for key in ("optimizer_in_backward", "offload_activations"):
        if getattr(training, key):
            raise UserError(f"training.{key} is implemented by the pairwise trainer (DPO family, APO, Curry-DPO), "
                            f"not by the online RL loop of method {recipe.method.name}: set training.{key}: false.")


def loss_settings(recipe: Recipe) -> tuple[str, Callable, dict, str]:
    """The policy loss term: name, function, hyperparameters (recipe over defaults), aggregation."""
    term = recipe.method.losses[0]
    function = LOSSES[term.name]
    # method.rl.hapo.preset also sets the clip ranges of the loss that HAPO's entropy signal drives.
    preset = recipe.method.rl.hapo.settings.loss_defaults if takes_entropy_signal(function) else {}
    params = {**hyperparameters(function), **preset, **term.params}
    if params["aggregation"] not in AGGREGATIONS:
        raise UserError(f"method.losses[0].aggregation: '{params['aggregation']}' is not one of {', '.join(AGGREGATIONS)}.")
    if params.get("dual_clip") is not None and not params["dual_clip"] > 1:
        raise UserError(f"method.losses[0].dual_clip: {params['dual_clip']} must be > 1 (dual-clip PPO's cap c on "
                        f"-A*r for negative advantages; null turns it off).")
    return term.name, function, params, params["aggregation"]


def takes_entropy_signal(loss_function: Callable) -> bool:
    """Whether the loss takes HAPO's per-token entropy signal (a `token_entropy_signal` input), which the loop
    then computes from the sampled tokens' entropies."""
    return "token_entropy_signal" in tensor_inputs(loss_function)


def total_steps(recipe: Recipe, num_prompts: int, world_size: int) -> int:
    if recipe.training.max_steps:
        return recipe.training.max_steps
    per_step = recipe.method.rl.prompts_per_step * world_size
    return max(1, math.floor(recipe.training.num_epochs * num_prompts / per_step))


def _seed(base: int, *parts: int) -> int:
    value = base
    for part in parts:
        value = (value * 1_000_003 + part) % (2 ** 31)
    return value


def collect_rollouts(model, run: RunInputs, order: PromptOrder, state: dict, rewards: WeightedRewards,
                     processor, world_size: int) -> tuple[Rollouts, torch.Tensor, dict]:
    """Sample, score and (DAPO) filter groups until the batch is full. Returns the kept rollouts (group-major),
    their rewards `[P, G]`, and metrics over everything sampled this step."""
    recipe, rl = run.recipe, run.recipe.method.rl
    size, generations = rl.prompts_per_step, rl.num_generations
    kept_parts, kept_rewards, sampled_rewards, sampled_parts, lengths, truncated = [], [], [], {}, [], []
    rounds = informative = sampled_groups = 0
    while True:
        rows = [run.train_data[i] for i in order.take(state["prompts_seen"], size)]
        state["prompts_seen"] += size * world_size
        rollouts = generate_rollouts(
            model, run.tokenizer, rows, generations, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
            top_p=rl.top_p, seed=_seed(recipe.training.seed, state["step"], rounds, order.rank),
            batch_size=rl.generation_batch_size, system_prompt=recipe.data.system_prompt, logits_processor=processor)
        total, parts = rewards(rollouts.texts, rollouts.rows)
        if rl.overlong_shaping:
            parts["overlong"] = overlong_penalty(rollouts.lengths, rl.max_new_tokens, rl.overlong_buffer)
            total = total + parts["overlong"]
        for name, values in parts.items():
            sampled_parts.setdefault(name, []).append(values)
        sampled_rewards.append(total)
        lengths.append(rollouts.lengths.float())
        truncated.append(rollouts.truncated.float())
        grouped = total.view(size, generations)
        useful = informative_groups(grouped)
        informative += int(useful.sum())
        sampled_groups += size
        keep = useful.nonzero().squeeze(1) if rl.dynamic_sampling else torch.arange(size)
        kept_parts.append(rollouts.select([g * generations + j for g in keep.tolist() for j in range(generations)]))
        kept_rewards.append(grouped[keep])
        rounds += 1
        if not rl.dynamic_sampling or sum(len(r) for r in kept_rewards) >= size or rounds >= rl.max_sampling_rounds:
            break
    if sum(len(r) for r in kept_rewards) == 0:  # nothing informative: train on the last round (zero gradient)
        kept_parts, kept_rewards = [rollouts], [grouped]
    batch = Rollouts.concatenate([p for p in kept_parts if len(p)])
    group_rewards = torch.cat(kept_rewards)[:size]
    batch = batch.select(range(len(group_rewards) * generations))
    every = torch.cat(sampled_rewards)
    metrics = {"reward/mean": float(every.mean()), "reward/std": float(every.std()) if every.numel() > 1 else 0.0,
               **{f"reward/{name}": float(torch.cat(v).mean()) for name, v in sampled_parts.items()},
               "reward/trained_mean": float(group_rewards.mean()),
               "completion_length/mean": float(torch.cat(lengths).mean()),
               "completion/truncated": float(torch.cat(truncated).mean()),
               "groups/informative": informative / sampled_groups, "groups/trained": len(group_rewards),
               "sampling/rounds": rounds}
    return batch, group_rewards, metrics


def build_train_batch(model, run: RunInputs, rollouts: Rollouts, group_rewards: torch.Tensor, progress: float,
                      needs_entropy: bool, needs_old_pass: bool, state: dict,
                      signal_to_loss: bool) -> tuple[TrainBatch, dict]:
    """Advantages, pi_old scores, D^3S selection, HAPO's entropy signal, masks: the step's `TrainBatch`."""
    recipe, rl = run.recipe, run.recipe.method.rl
    training, hapo, d3s = recipe.training, rl.hapo, rl.d3s
    pad_id = run.tokenizer.pad_token_id
    per_token = hapo.settings.score_temperature == "sampled"  # scoring temperature: see align_cli.rl.rollout.score
    lengths = rollouts.lengths
    advantages = advantages_of(group_rewards, lengths.view(group_rewards.shape).float(), hapo.token_level_advantage,
                               hapo.advantage_fallback)
    mask = completion_mask(lengths)
    old_logps = entropy = None
    if needs_old_pass or needs_entropy:
        old_logps, entropy = score_in_chunks(model, rollouts, pad_id, training.batch_size,
                                             fused=training.fused_logprobs, with_entropy=needs_entropy,
                                             temperature=rl.temperature, per_token_temperature=per_token)
        old_logps, entropy = old_logps.cpu(), (entropy.cpu() if entropy is not None else None)
    metrics = {"advantage/abs_mean": float(advantages.abs().mean())}
    if old_logps is not None and rollouts.sampler_logps is not None:  # fast path: sampler vs trainer log-probs
        metrics["generation/logp_gap"] = logp_gap(rollouts.sampler_logps, old_logps, mask)
    signal = None
    if entropy is not None:
        metrics["entropy/mean"] = float((entropy * mask).sum() / mask.sum())
        signal, stats = entropy_signal(entropy, mask, hapo.rho, hapo.settings.entropy_sign)
        state["entropy_stats"] = stats.as_dict()  # the next step's adaptive temperature reads these
    if rollouts.sampling_entropies is not None:  # recorded while sampling: what the adaptive temperature measures
        state["entropy_stats"] = sampling_statistics(rollouts.sampling_entropies, hapo.rho).as_dict()
    selection = Selection(torch.arange(len(rollouts)), None)
    if d3s.enabled:
        m, keep_percent = d3s_schedule(progress, d3s.m_init, d3s.m_final, d3s.keep_init, d3s.keep_final)
        selection = d3s_selection(advantages, entropy, mask, m, keep_percent, d3s.sample_scope, d3s.token_scope)
        metrics.update({"d3s/m": m, "d3s/keep_percent": keep_percent})
    kept = selection.rollouts
    loss_mask = mask[kept].clone()
    if selection.token_mask is not None:
        loss_mask = loss_mask * selection.token_mask.to(loss_mask.dtype)
    if rl.mask_truncated:
        loss_mask = loss_mask * (~rollouts.truncated[kept]).to(loss_mask.dtype)[:, None]
    trained = rollouts.select(kept)
    if d3s.enabled:
        metrics.update({"d3s/rollouts": len(kept) / len(rollouts),
                        "d3s/tokens": float(loss_mask.sum() / mask.sum().clamp(min=1))})
    ref_logps = None
    if run.reference_model is not None:
        ref_logps, _ = score_in_chunks(run.reference_model, trained, pad_id, training.batch_size,
                                       fused=training.fused_logprobs, with_entropy=False, context=run.reference_context,
                                       temperature=rl.temperature, per_token_temperature=per_token)
        ref_logps = ref_logps.cpu()
    metrics["loss_tokens"] = float(loss_mask.sum())
    batch = TrainBatch(trained, advantages.reshape(-1)[kept].float(), mask[kept], loss_mask,
                       old_logps[kept] if old_logps is not None else None, ref_logps,
                       signal[kept] if signal_to_loss else None, temperature=rl.temperature,
                       per_token_temperature=per_token,
                       micro_batch_signal=(hapo.rho, hapo.settings.entropy_sign)
                       if signal_to_loss and hapo.settings.signal_source == "micro_batch" else None)
    return batch, metrics


def logp_gap(sampler_logps: list[list[float]], trainer_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """mean |sampler log-prob - trainer log-prob| over completion tokens: the fast sampler's arithmetic
    (batch shapes, CUDA graph, bf16) against the trainer's scoring of the same weights and tokens."""
    sampled = torch.zeros_like(trainer_logps)
    for row, values in enumerate(sampler_logps):
        sampled[row, : len(values)] = torch.tensor(values, dtype=sampled.dtype)
    return float(((sampled - trainer_logps).abs() * mask).sum() / mask.sum().clamp(min=1))


def _measure(run: RunInputs, model) -> dict:
    evaluation = run.recipe.evaluation
    if not run.task_rows:
        return {}
    return task_accuracy(model, run.tokenizer, run.task_rows, evaluation.max_new_tokens, evaluation.batch_size,
                         run.recipe.data.system_prompt)


@holds_run_directory  # the run directory's lock and an --overwrite's old run, released / settled on exit
def train_rl(recipe: Recipe, recipe_path: Path | None = None, output_dir: str | None = None, resume: bool = False,
             overwrite: bool = False, on_step_end: Callable[[int], None] | None = None,
             allow_recipe_change: bool = False) -> dict:
    """Run an online RL recipe (`method.name: grpo`); return the run summary (also `summary.json`)."""
    refuse_sharding_engines(recipe)
    loss_name, loss_function, params, aggregation = loss_settings(recipe)
    rl, training = recipe.method.rl, recipe.training
    needs_reference = "ref_token_logps" in used_inputs(loss_function, params)  # a KL term (kl_beta > 0)
    run = prepare_rl_run(recipe, recipe_path, output_dir, resume, overwrite, needs_reference=needs_reference,
                         allow_recipe_change=allow_recipe_change)
    accelerator = run.accelerator
    rewards = WeightedRewards(rl.rewards)
    signal_to_loss = takes_entropy_signal(loss_function)
    needs_entropy = rl.d3s.enabled or signal_to_loss  # adaptive temperature: recorded while sampling
    updates_per_step = rl.passes * rl.mini_batches
    order = PromptOrder(len(run.train_data), training.seed, accelerator.num_processes, accelerator.process_index)
    steps = total_steps(recipe, len(run.train_data), accelerator.num_processes)

    model = run.policy
    optimizer, scheduler = optimiser_and_schedule(model, training, steps, updates_per_step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if run.reference_model is run.policy:
        run.reference_model = model

    state = resumed_state(accelerator, run.run_dir, resume,
                          {"step": 0, "prompts_seen": 0, "tokens": 0, "seconds": 0.0, "entropy_stats": None})
    before = measured_before(run, lambda: _measure(run, model), "prompts")

    guard = DivergenceGuard(accelerator, run.run_dir, model)
    monitor = CollapseMonitor(**state.get("collapse", {}))  # resumed with the checkpoint
    log = MetricsLog(run.run_dir, recipe.logging.tensorboard, accelerator.is_main_process)
    stop = StopFlag()
    stop.install()
    profiler = RunStepProfile(run.run_dir, recipe.logging.profile_step, accelerator.process_index)
    model.train()
    started, last_metrics = time.time(), {}
    try:
        with progress_bar(recipe.logging.progress and accelerator.is_main_process) as progress:
            task = progress.add_task(f"{recipe.method.name}/{loss_name}", total=steps, completed=state["step"],
                                     loss=float("nan"), accuracy=float("nan"), tokens_per_second=0.0)
            while state["step"] < steps:
                step_started = time.time()
                state["step"] += 1
                profiler.begin(state["step"])
                processor = None
                if rl.hapo.adaptive_temperature:  # step 1 (no statistics yet): factor 1, records temperatures
                    stats = EntropyStats(**state["entropy_stats"]) if state["entropy_stats"] is not None else None
                    processor = AdaptiveTemperature(stats, rl.hapo.settings.tau, rl.hapo.settings.entropy_sign)
                rollouts, group_rewards, metrics = collect_rollouts(model, run, order, state, rewards, processor,
                                                                    accelerator.num_processes)
                if processor is not None and processor.stats is not None:
                    metrics["hapo/temperature_factor"] = processor.mean_factor
                generated = time.time()
                progress_fraction = (state["step"] - 1) / max(1, steps - 1)
                batch, batch_metrics = build_train_batch(model, run, rollouts, group_rewards, progress_fraction,
                                                         needs_entropy, updates_per_step > 1, state,
                                                         signal_to_loss=signal_to_loss)
                metrics.update(batch_metrics)
                updates = optimise(
                    model, batch, loss_function=loss_function, params=params, weight=recipe.method.losses[0].weight,
                    aggregation=aggregation, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler,
                    passes=rl.passes, mini_batches=rl.mini_batches, micro_batch_size=training.batch_size,
                    max_grad_norm=training.max_grad_norm, pad_id=run.tokenizer.pad_token_id,
                    fused=training.fused_logprobs, seed=_seed(training.seed, state["step"], 7),
                    guard=guard, step=state["step"])
                metrics.update({k: sum(u[k] for u in updates) / len(updates) for k in updates[-1]})
                profiler.end(state["step"])
                elapsed = time.time() - step_started
                tokens = int(rollouts.lengths.sum())
                state["tokens"] += tokens
                state["seconds"] += elapsed
                metrics.update(learning_rate=scheduler.get_last_lr()[0], step_seconds=elapsed,
                               generation_seconds=generated - step_started, tokens_per_second=tokens / max(elapsed, 1e-9))
                last_metrics = metrics
                # A zero gradient is right when every advantage is zero (all groups' rewards equal) or no token
                # is trained: only other steps count towards a collapse.
                monitor.observe(state["step"], metrics["loss"], metrics.get("grad_norm"),
                                expects_gradient=metrics["advantage/abs_mean"] > 0 and metrics["loss_tokens"] > 0,
                                announce=accelerator.is_main_process)
                state["collapse"] = monitor.as_dict()
                if state["step"] % recipe.logging.every == 0 or state["step"] == steps:
                    log.log(state["step"], metrics)
                progress.update(task, completed=state["step"], loss=metrics["loss"], accuracy=metrics["reward/mean"],
                                tokens_per_second=metrics["tokens_per_second"])
                if training.eval_every and state["step"] % training.eval_every == 0 and state["step"] < steps:
                    log.log(state["step"], {k: v for k, v in _measure(run, model).items() if isinstance(v, (int, float))},
                            prefix="eval")
                end_optimiser_step(accelerator, recipe, run.run_dir, state, steps, stop, on_step_end, guard=guard)
    finally:
        stop.restore()
        log.close()

    after, final_dir = finish(run, model, log, state["step"], lambda: _measure(run, model), "prompts")
    summary = {
        "recipe": str(recipe_path) if recipe_path else None,
        "method": recipe.method.name,
        "loss": {"name": loss_name, **params},
        "model": recipe.model.name,
        "steps": state["step"],
        "prompts": len(run.train_data),
        "prompts_seen": state["prompts_seen"],
        "data_report": run.data_report,
        "completion_tokens": state["tokens"],
        **timing(state, started),
        "final_train_metrics": last_metrics,
        "memory": run.memory_report(),
        "liger_kernels": run.liger_kernels,
        "before": before,
        "after": after,
        "final_model_dir": final_dir,
        "warnings": monitor.warnings,
    }
    return write_summary(run.run_dir, summary, accelerator.is_main_process)
