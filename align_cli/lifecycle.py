"""What every training loop shares around its steps: stopping on a signal, the optimiser and its LR schedule,
resuming, the before/after measurement, and finishing the run (final model, summary.json).

The loops themselves (`pairwise.trainer.train`, the pairwise one; `rl.trainer.train_rl`, the online one; the iterative
loops of `iterative/`, which call the pairwise trainer per iteration or stage) stay readable top to bottom: they
call these in order, and each keeps its own step and its own summary. `TrainingDiverged` lives with the checks
that raise it, in `divergence.py`.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from .config import Recipe, TrainingConfig
from .divergence import DivergenceGuard
from .optimizer_in_backward import AdamWInBackward
from .run_dir import first_checkpoint_written
from .run_log import MetricsLog
from .run_setup import RunInputs


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, signal_number: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.signal_number, self.checkpoint = step, signal_number, checkpoint


@dataclass
class StopFlag:
    signal_number: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, number, _frame) -> None:
        self.signal_number = number

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def end_optimiser_step(accelerator, recipe: Recipe, run_dir: Path, state: dict, last_step: int, stop: StopFlag,
                       on_step_end: Callable[[int], None] | None, *, guard: DivergenceGuard) -> None:
    """What every trainer does after an optimiser step: the scheduled (and final) checkpoint, the caller's
    hook, and, after SIGINT/SIGTERM, a checkpoint and `Interrupted`. A checkpoint is saved only if every
    trainable parameter is finite (`guard.check_parameters`, else `TrainingDiverged`)."""
    step, checkpointing = state["step"], recipe.checkpointing
    if (checkpointing.every and step % checkpointing.every == 0) or step == last_step:
        guard.check_parameters(step)
        _checkpoint(accelerator, run_dir, step, state, checkpointing.keep_last)
    if on_step_end is not None:
        on_step_end(step)
    if stop.signal_number is not None:
        guard.check_parameters(step)
        saved = _checkpoint(accelerator, run_dir, step, state, checkpointing.keep_last)
        raise Interrupted(step, stop.signal_number, saved)


def _checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    saved = save_checkpoint(accelerator, run_dir, step, state, keep_last)
    if accelerator.is_main_process:
        first_checkpoint_written()  # an --overwrite run's predecessor, kept until now, can go
    return saved


def optimiser_and_schedule(model, training: TrainingConfig, steps: int, updates_per_step: int = 1):
    """AdamW over the trainable parameters and the recipe's LR schedule over all optimiser steps. A training
    step is `updates_per_step` optimiser steps (the online loop's passes x mini-batches; 1 for the pairwise
    one), so `training.warmup_steps`, counted in training steps, is scaled by it. With
    `training.optimizer_in_backward` the same AdamW steps each parameter inside backward (`AdamWInBackward`)."""
    adamw = AdamWInBackward if training.optimizer_in_backward else torch.optim.AdamW
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=training.learning_rate,
                      betas=training.adam_betas, weight_decay=training.weight_decay)
    from transformers import get_scheduler

    optimizer_steps = steps * updates_per_step
    warmup = training.warmup_steps * updates_per_step or int(training.warmup_ratio * optimizer_steps)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=optimizer_steps)
    return optimizer, scheduler


def resumed_state(accelerator, run_dir: Path, resume: bool, fresh: dict) -> dict:
    """The loop's state: `fresh`, updated from the newest checkpoint that verifies when resuming."""
    state = dict(fresh)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint))
        accelerator.print(f"Resuming from {checkpoint} (step {state['step']}).")
    return state


def measured_before(run: RunInputs, measure: Callable[[], dict], held_out: str) -> dict:
    """The starting model's measurement: read from `before.json` when a resumed run made it, else measured now
    and written (by the main process). `held_out` names what is measured ("data", "prompts")."""
    before_path = run.run_dir / "before.json"
    if before_path.exists():
        return json.loads(before_path.read_text())
    run.accelerator.print(f"Measuring the starting model on held-out {held_out}...")
    before = measure()
    if run.accelerator.is_main_process:
        write_json_atomic(before_path, before)
    return before


def finish(run: RunInputs, model, log: MetricsLog, step: int, measure: Callable[[], dict],
           held_out: str) -> tuple[dict, str | None]:
    """After the last step: the trained model measured as `measured_before` measured the starting one (its
    numbers logged under `eval`), and saved as `final_model/` when `output.save_final_model`. Returns the
    measurement and the final model's directory (None when not saved)."""
    run.accelerator.print(f"Measuring the trained model on held-out {held_out}...")
    after = measure()
    log.log(step, {k: v for k, v in after.items() if isinstance(v, (int, float))}, prefix="eval")
    final_dir = run.save_final_model(model) if run.recipe.output.save_final_model else None
    return after, str(final_dir) if final_dir else None


def timing(state: dict, started: float) -> dict:
    """The summary's timing: seconds in training steps, tokens per second over them, and this process's wall time."""
    return {"train_seconds": round(state["seconds"], 2),
            "tokens_per_second": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
            "wall_seconds_this_process": round(time.time() - started, 2)}


def write_summary(run_dir: Path, summary: dict, is_main_process: bool) -> dict:
    """`summary.json` (by the main process), the run's last file; returns the summary."""
    if is_main_process:
        write_json_atomic(run_dir / "summary.json", summary)
    return summary
