"""Divergence and collapse: the checks both training loops (pairwise `pairwise/trainer.py`, online RL `rl/`) share.

Divergence (a non-finite loss, gradient norm or parameter) stops the run before the bad step reaches the
weights or a checkpoint: the loss is checked before `backward`, the total gradient norm before
`optimizer.step()`, the trainable parameters before every checkpoint. `TrainingDiverged` (exit 2) names the
step and the last checkpoint on disk, which is finite because nothing non-finite is ever saved. With
`training.optimizer_in_backward` each parameter steps inside backward; there every gradient is checked on the
device before its parameter steps, and the norm after backward (`optimizer_in_backward.py`).

Collapse (the run goes on, but learns nothing) is only warned about: see `CollapseMonitor`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import list_checkpoints
from .errors import UserError

NOT_APPLIED = "That step was not applied and nothing non-finite was saved"
ADVICE = ("Lower training.learning_rate, keep training.max_grad_norm set, check the data, or use "
          "training.precision: fp32.")


class TrainingDiverged(UserError):
    """A non-finite loss, gradient norm or parameter: the run stops; that step is neither applied nor saved."""


class CollapseWarning(UserWarning):
    """The run goes on but has stopped learning (see `CollapseMonitor`)."""


def gradient_norm(accelerator, parameters: list[torch.Tensor], max_grad_norm: float | None) -> float | None:
    """The total gradient norm, after unscaling; the gradients are clipped to `max_grad_norm` when it is set.
    Without clipping the norm is still computed (clipping to +inf multiplies every gradient by exactly 1.0).

    None under DeepSpeed: its engine steps inside `accelerator.backward`, so the norm accelerate reports is
    the previous step's, too late to stop anything; the loss check and the parameter check before each
    checkpoint still hold there."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    norm = accelerator.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm else math.inf)
    return None if norm is None else float(norm)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (a DTensor's shard under FSDP2), detached."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach()


def parameters_finite(accelerator, parameters: list[torch.Tensor]) -> bool:
    """Whether every element of every parameter is finite, on all processes: one fused max-|x| reduction
    over the local tensors (NaN and inf propagate through it), and one all-reduce of the flag."""
    local = [t for t in map(_local, parameters) if t.numel()]  # ZeRO-3 leaves empty placeholders
    bad = torch.zeros((), device=accelerator.device)
    if local:
        norms = torch._foreach_norm(local, math.inf)
        bad = (~torch.stack([n.float() for n in norms]).isfinite().all()).float().to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "max")
    return not bool(bad)


@dataclass
class DivergenceGuard:
    """The three divergence checks of one run. `model`: its trainable parameters are checked (frozen ones cannot
    change), read at each check: FSDP2 swaps a module's parameters between sharded DTensors and unsharded tensors,
    and a unit left unsharded by a no-grad forward (reshard_after_forward=False: the embedding and head group)
    would leave freed tensors in a list taken then."""

    accelerator: object
    run_dir: Path
    model: torch.nn.Module

    def last_finite_checkpoint(self) -> str:
        """The newest complete checkpoint: finite, since each one passed `check_parameters` before its save."""
        found = list_checkpoints(self.run_dir)
        return str(found[-1]) if found else "none yet"

    def diverged(self, step: int, what: str, outcome: str = NOT_APPLIED) -> TrainingDiverged:
        return TrainingDiverged(
            f"Training diverged at step {step}: {what}. {outcome}; the last finite checkpoint is "
            f"{self.last_finite_checkpoint()}. {ADVICE}")

    def check_loss(self, loss: torch.Tensor | float, step: int, detail: str = "") -> None:
        """Before `backward` (or, summed, before `optimizer.step()`). Every process raises together: the flag is
        shared, so none is left waiting in a collective."""
        value = loss if isinstance(loss, float) else float(loss.detach())
        finite = math.isfinite(value)
        bad = torch.tensor(float(not finite), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "max")
        if bool(bad):
            raise self.diverged(step, f"the loss became {value}{detail}")

    def check_gradient_norm(self, norm: float | None, step: int, loss: float | None = None,
                            outcome: str = NOT_APPLIED) -> None:
        """Before `optimizer.step()`; `norm` from `gradient_norm`, the same on every process. With an fp16 grad
        scaler a non-finite norm is routine (the scaler skips that step and lowers its scale), so it is left to
        the scaler; None (DeepSpeed) cannot be checked. `outcome`: what became of the step (with
        training.optimizer_in_backward it ran inside backward: `optimizer_in_backward.STEP_OUTCOME`)."""
        if norm is None or math.isfinite(norm) or getattr(self.accelerator, "scaler", None) is not None:
            return
        finite_loss = f" (the loss, {loss:.4g}, was finite)" if loss is not None and math.isfinite(loss) else ""
        raise self.diverged(step, f"the gradient norm became {norm}{finite_loss}", outcome)

    def check_parameters(self, step: int) -> None:
        """Before every checkpoint: a checkpoint never holds non-finite weights."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not parameters_finite(self.accelerator, trainable):
            raise self.diverged(step, "a trainable parameter became non-finite (NaN or inf)")


@dataclass
class CollapseMonitor:
    """Warns (once per kind, in the log and in summary.json's `warnings`) when a run has collapsed:

    - loss rise: the step's loss stays above `start + max(1, |start|)` for `patience` consecutive steps,
      `start` being the first step's loss (DPO starts at log 2 = 0.69: warned above 1.69). One step above is
      noise; a doubled loss that stays is a run pushed out of its basin (too high a learning rate).
    - zero gradient: the gradient norm is exactly 0.0 for `patience` consecutive steps that should have a
      gradient. Exact zero, not small: only saturated probabilities (every log-prob's gradient underflowed)
      give it. The RL loop passes `expects_gradient=False` for steps whose advantages are all zero (every
      group's rewards equal), where a zero gradient is correct.

    `patience` is 3: long enough to pass one-step spikes, short enough to be seen in a 10-step smoke run.
    The fields are plain numbers so that the monitor's state goes into `trainer_state.json` and survives
    `--resume` (`CollapseMonitor(**state["collapse"])`)."""

    patience: int = 3
    start_loss: float | None = None
    high_loss_steps: int = 0
    zero_gradient_steps: int = 0
    warned: list = field(default_factory=list)     # kinds already warned about
    warnings: list = field(default_factory=list)   # their messages, for summary.json

    def loss_limit(self) -> float | None:
        return None if self.start_loss is None else self.start_loss + max(1.0, abs(self.start_loss))

    def observe(self, step: int, loss: float, grad_norm: float | None, expects_gradient: bool = True,
                announce: bool = True) -> list[str]:
        """Record one finished step; return the warnings it raises, issued with `warnings.warn` (to stderr)
        when `announce` (the main process: every process observes, so that their states stay equal)."""
        if self.start_loss is None and math.isfinite(loss):
            self.start_loss = loss
        limit = self.loss_limit()
        self.high_loss_steps = self.high_loss_steps + 1 if limit is not None and loss > limit else 0
        if grad_norm is not None and expects_gradient:
            self.zero_gradient_steps = self.zero_gradient_steps + 1 if grad_norm == 0.0 else 0
        new = []
        if self.high_loss_steps >= self.patience and "loss_rise" not in self.warned:
            new.append(("loss_rise", f"Step {step}: the loss has stayed above {limit:.4g} (its start, "
                        f"{self.start_loss:.4g}, plus max(1, |start|)) for {self.high_loss_steps} consecutive steps; "
                        f"now {loss:.4g}. The run has likely collapsed: lower training.learning_rate."))
        if self.zero_gradient_steps >= self.patience and "zero_gradient" not in self.warned:
            new.append(("zero_gradient", f"Step {step}: the gradient norm has been exactly 0 for "
                        f"{self.zero_gradient_steps} consecutive steps: the model's probabilities have saturated "
                        f"and it no longer learns (the run has collapsed). Lower training.learning_rate."))
        for kind, message in new:
            self.warned.append(kind)
            self.warnings.append(message)
            if announce:
                warnings.warn(message, CollapseWarning, stacklevel=2)
        return [message for _, message in new]

    def as_dict(self) -> dict:
        return asdict(self)
