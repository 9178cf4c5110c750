"""The optimisation side of a step: the trained batch, split into mini-batches (optimiser steps) and
micro-batches (gradient accumulation), with the loss normalised by each optimiser step's global count."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..divergence import DivergenceGuard, gradient_norm
from ..losses import used_inputs
from ..losses.hapo import entropy_signal
from .rollout import Rollouts, score


@dataclass
class TrainBatch:
    """Everything the loss needs for the step's trained rollouts; per-token tensors are `[N, T]`."""

    rollouts: Rollouts
    advantages: torch.Tensor             # [N]
    completion_mask: torch.Tensor        # [N, T] float
    loss_mask: torch.Tensor              # [N, T] float: completion tokens that get gradient
    old_logps: torch.Tensor | None       # [N, T]; None: pi_old is the current policy (one update per step)
    ref_logps: torch.Tensor | None       # [N, T] for the KL term
    entropy_signal: torch.Tensor | None  # [N, T] HAPO's ht
    # What the rollouts were sampled at (rl.temperature); the policy is scored under the same distribution, per
    # token where the rollouts recorded per-token temperatures and `per_token_temperature`.
    temperature: float = 1.0
    per_token_temperature: bool = True
    # HAPO's released code: recompute ht per micro-batch from the current policy's entropies, with (rho, sign);
    # None: use `entropy_signal`.
    micro_batch_signal: tuple[float, str] | None = None

    def __len__(self) -> int:
        return len(self.rollouts)


def normaliser_count(loss_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What `aggregate` divides by, counted over a whole optimiser step: loss tokens (`token-mean`) or
    sequences with at least one loss token (`seq-mean-token-mean`)."""
    if aggregation == "token-mean":
        return loss_mask.sum()
    return (loss_mask.sum(dim=1) > 0).sum().to(loss_mask.dtype)


def micro_batch_loss(model, batch: TrainBatch, indices: torch.Tensor, loss_function: Callable, params: dict,
                     normaliser, pad_id: int, fused: bool):
    """The loss of one micro-batch (its share of the optimiser step's loss) and the loss's metrics."""
    part = batch.rollouts.select(indices)
    policy_logps, policy_entropy = score(model, part, pad_id, fused=fused,
                                         with_entropy=batch.micro_batch_signal is not None,
                                         temperature=batch.temperature,
                                         per_token_temperature=batch.per_token_temperature)
    device = policy_logps.device
    width = policy_logps.shape[1]

    def rows(tensor):
        return tensor[indices][:, :width].to(device)

    inputs = {
        "policy_token_logps": policy_logps,
        "old_token_logps": rows(batch.old_logps) if batch.old_logps is not None else policy_logps.detach(),
        "advantages": batch.advantages[indices].to(device),
        "completion_mask": rows(batch.completion_mask),
        "loss_mask": rows(batch.loss_mask),
        "loss_normaliser": normaliser,
    }
    if batch.ref_logps is not None:
        inputs["ref_token_logps"] = rows(batch.ref_logps)
    if batch.micro_batch_signal is not None:
        # As verl's compute_policy_loss (HAPO's released code): statistics over every completion token of the
        # micro-batch, from the current policy's entropies, without gradient.
        rho, sign = batch.micro_batch_signal
        inputs["token_entropy_signal"], _ = entropy_signal(policy_entropy.detach(), inputs["completion_mask"], rho, sign)
    elif batch.entropy_signal is not None:
        inputs["token_entropy_signal"] = rows(batch.entropy_signal)
    return loss_on_inputs(loss_function, inputs, params)


def loss_on_inputs(loss_function: Callable, inputs: dict, params: dict):
    """Call the loss with the inputs it uses with these hyperparameters (its signature and `uses`, as the
    pairwise `Objective` does); the mean loss and its metrics."""
    wanted = used_inputs(loss_function, params)
    missing = [name for name, required in wanted.items() if required and name not in inputs]
    if missing:
        raise KeyError(f"the loss needs {missing}, which the online RL loop did not compute")
    per_sequence, metrics = loss_function(**{name: inputs[name] for name in wanted if name in inputs}, **params)
    return per_sequence.mean(), metrics


def optimise(model, batch: TrainBatch, *, loss_function: Callable, params: dict, weight: float, aggregation: str,
             accelerator, optimizer, scheduler, passes: int, mini_batches: int, micro_batch_size: int,
             max_grad_norm: float | None, pad_id: int, fused: bool, seed: int,
             guard: DivergenceGuard | None = None, step: int = 0) -> list[dict]:
    """`passes` x `mini_batches` optimiser steps over the batch; one metrics dict per optimiser step.

    Each optimiser step's loss is `sum over its micro-batches` of the micro-batch losses, each normalised by
    the step's global count (all micro-batches, all processes), so the gradient equals that of the whole
    mini-batch at once. `accelerator.backward` divides by its accumulation steps and DDP averages over
    processes; both are undone here so the sum stays exact.

    With a `guard`, each optimiser step's loss and gradient norm are checked before `optimizer.step()`
    (`TrainingDiverged` names `step`, the trainer's step). The loss is checked once per optimiser step, not per
    micro-batch: processes may hold different numbers of micro-batches, and the check is a collective. A
    non-finite micro-batch loss makes the summed loss non-finite, so none escapes.
    """
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    # One generator per step, drawn once per pass: `seed` is already the step's own (rl.trainer._seed), so the
    # orders are a pure function of (seed, step) on every process and on resume, as data.batching.seeded_permutation's
    # are for epochs; kept apart from it so that runs made before the restructuring replay their mini-batches.
    generator = torch.Generator().manual_seed(seed)
    results = []
    for _ in range(passes):
        order = torch.randperm(len(batch), generator=generator)
        for mini_batch in order.chunk(mini_batches):
            update = f" (optimiser update {len(results) + 1} of {passes * mini_batches} in this step)"
            local = normaliser_count(batch.loss_mask[mini_batch], aggregation).to(accelerator.device)
            normaliser = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
            micro = list(mini_batch.split(micro_batch_size))
            step_loss, step_metrics = 0.0, []
            for position, indices in enumerate(micro):
                last = position == len(micro) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss, metrics = micro_batch_loss(model, batch, indices, loss_function, params, normaliser,
                                                     pad_id, fused)
                    loss = weight * loss
                    accelerator.backward(loss * scale)
                step_loss += float(loss.detach())
                step_metrics.append({k: float(v) for k, v in metrics.items()})
            if guard is not None:
                guard.check_loss(step_loss, step, update)
            result = {"loss": step_loss,
                      **{k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}}
            norm = gradient_norm(accelerator, model.parameters(), max_grad_norm)
            if norm is not None:  # None under DeepSpeed (see `gradient_norm`)
                result["grad_norm"] = norm
            if guard is not None:
                guard.check_gradient_norm(norm, step, result["loss"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            results.append(result)
    return results
