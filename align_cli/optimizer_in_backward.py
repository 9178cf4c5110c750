"""`training.optimizer_in_backward`: each parameter's AdamW step runs inside backward, as soon as that parameter's
gradient is complete, and the gradient is freed right after (torchtune's `optimizer_in_bwd`).

Why it saves memory: the normal step needs every gradient at once (one parameter-sized copy, 2 bytes per
parameter in bf16) and torch's multi-tensor AdamW allocates one more parameter-sized temporary (the square root
of `exp_avg_sq`). Here a gradient lives only from its accumulation to its parameter's step, and the fused AdamW
kernel allocates nothing. The tied embedding of a model like Llama-3.2-1B is the exception: its LM-head
gradient waits in autograd's buffer for the embedding's contribution, which comes last.

The optimiser is `torch.optim.AdamW(fused=True)` itself (`AdamWInBackward`): its update, its `state_dict` (the
same layout as the normal path's AdamW, so checkpoints and `--resume` work unchanged) and its one parameter
group (which the LR schedule drives) are torch's. A hook steps one parameter by calling `AdamW.step` with the
group narrowed to that parameter; the loop's own `optimizer.step()` then has nothing left to do.

What it changes, and why (docs/throughput.md):

- Clipping: refused (`training.max_grad_norm` must be null; config.py). The global norm exists only after the
  last gradient, when every other parameter has stepped. Clipping with the previous step's norm would let the
  spike through at the step it happens, which is what clipping is for; two backward passes would cost a second
  backward. The norm is still computed (the sum of each gradient's squared norm) and logged as `grad_norm`.
- Gradient accumulation: micro-batches before the last accumulate into `.grad` as usual (`begin_backward(stepping=
  False)`); the last one's backward steps and frees. The gradients then live through the earlier backwards, so
  the saving is the optimiser's temporaries and the last backward's freed gradients, not all of them.
- Non-finite gradients: no non-finite value ever reaches a weight or an optimiser state. Each hook adds its
  gradient's squared norm to a running sum on the device; the fused kernel reads `found_inf` (1 once that sum is
  no longer finite) and leaves the parameter, its moments and its step count untouched. So the first non-finite
  gradient and every one after it are skipped, without a host synchronisation per parameter. After backward the
  loop reads the norm once and stops the run (`TrainingDiverged`, nothing saved). The parameters stepped before
  the first non-finite gradient keep their finite update in memory: undoing it would need a copy of every
  parameter and both moments (6 bytes per parameter in bf16), more than the mode saves. `STEP_OUTCOME` says so
  in the error.
- Engines: one process only. DDP averages gradients in its own hooks after they accumulate (a step inside the
  hook would use this process's gradient alone), and FSDP2 / DeepSpeed own the gradients and the step; refused
  before anything is written (`refuse_engines`). fp16's grad scaler needs every gradient before any step: refused.
"""

from __future__ import annotations

import math
import os

import torch

from .errors import UserError

STEP_OUTCOME = ("No non-finite value reached the weights and nothing of that step was saved; with "
                "training.optimizer_in_backward the parameters whose gradients were complete before the first "
                "non-finite one took their (finite) update in memory, the others kept their values")


def refuse_engines() -> None:
    """One process only: refused under `accelerate launch` with several processes, FSDP or DeepSpeed, read from the
    environment `accelerate launch` exports (as the Accelerator will read it), before anything is written."""
    from .distributed import requested_sharding_engine

    engine = requested_sharding_engine()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if engine is None and processes == 1:
        return
    where = engine or f"DDP ({processes} processes)"
    raise UserError(f"training.optimizer_in_backward runs on one process only, not under {where}: it steps each "
                    f"parameter inside backward, before DDP has averaged the gradients across processes and where "
                    f"FSDP and DeepSpeed own the gradients and the optimiser step. Set "
                    f"training.optimizer_in_backward: false, or launch on one process.")


class AdamWInBackward(torch.optim.AdamW):
    """torch.optim.AdamW (fused) whose parameters step in backward, each as its gradient completes (module docstring).

    Per optimiser step the loop calls `begin_backward(stepping)` before each micro-batch's backward (`stepping`:
    the last micro-batch, `accelerator.sync_gradients`), and `end_backward()` after the last one, which returns the
    gradient norm (inf or nan when a gradient was not finite). `remove_hooks()` when training ends."""

    def __init__(self, parameters, **hyperparameters):
        parameters = list(parameters)
        super().__init__(parameters, fused=True, **hyperparameters)
        self.stepping = False
        self.square_sum: torch.Tensor | None = None  # sum of this step's squared gradient norms, on the device
        self.found_inf: torch.Tensor | None = None  # read by AdamW.step's fused kernel: 1.0 leaves a parameter as is
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in parameters]

    def begin_backward(self, stepping: bool) -> None:
        """Before a micro-batch's backward: `stepping` steps each parameter in it (the last micro-batch of a step);
        otherwise gradients accumulate. A stepping backward starts a new norm."""
        self.stepping = stepping
        if stepping:
            device = self.param_groups[0]["params"][0].device  # where prepare() moved the model
            self.square_sum = torch.zeros((), dtype=torch.float32, device=device)
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def _step_parameter(self, parameter: torch.Tensor) -> None:
        if not self.stepping:
            return
        norm = torch.linalg.vector_norm(parameter.grad).float()
        self.square_sum.add_(norm * norm)
        self.found_inf.copy_(~self.square_sum.isfinite())  # stays 1 from the first non-finite gradient on
        group = self.param_groups[0]
        everything = group["params"]
        group["params"] = [parameter]  # AdamW.step visits every parameter with a gradient: only this one is complete
        try:
            torch.optim.AdamW.step(self)
        finally:
            group["params"] = everything
        parameter.grad = None

    def end_backward(self) -> float:
        """After the last micro-batch's backward: steps the parameters no hook reached in it (a parameter that had a
        gradient from an earlier micro-batch only, as the normal step would use it), and returns the gradient norm
        (one host synchronisation)."""
        for parameter in self.param_groups[0]["params"]:
            if parameter.grad is not None:
                self._step_parameter(parameter)
        self.stepping = False
        return math.sqrt(float(self.square_sum))

    def step(self, closure=None):
        """The loop's `optimizer.step()`: every parameter stepped in backward already (`_step_parameter`)."""
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then back to the fused kernel: a checkpoint of the normal path (`--resume --allow-recipe-change`)
        brings `fused: None` and each `step` on the CPU, where the fused kernel wants it on the parameter's device."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for parameter in group["params"]:
                state = self.state.get(parameter, {})
                if "step" in state:
                    state["step"] = state["step"].to(dtype=torch.float32, device=parameter.device)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
