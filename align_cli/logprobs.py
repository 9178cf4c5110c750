"""Per-sequence log-prob sums of completion tokens, from a model and a `SequenceBatch`.

Only the positions that predict a completion token reach the LM head, and with the fused kernel
(`align_cli.kernels.linear_logprobs`) the `[tokens, vocab]` logits are never materialised.

The model is always called whole, through whatever wraps it (DDP, FSDP2, a DeepSpeed engine, PEFT),
never its decoder alone: DDP only synchronises gradients after its own forward, FSDP2's root and
DeepSpeed's ZeRO-3 hooks gather parameters in the modules' forwards (and again for their backward).
For the duration of that call the LM head's forward computes the log-probs instead of logits
(`_head_scores_labels`), so the head's weight is used inside the head's own forward like any layer's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data.batching import IGNORE, SequenceBatch
from .data.packing import PackedSequenceBatch
from .models import output_head, unwrap


@dataclass
class SequenceLogps:
    sums: torch.Tensor                 # [S] float32 sum of completion-token log-probs
    token_counts: torch.Tensor         # [S] float32 completion tokens per sequence
    token_logps: torch.Tensor          # [M] float32, the trained positions in row-major order
    token_entropy: torch.Tensor | None # [M] float32 when requested
    token_sequence: torch.Tensor       # [M] sequence of each position


def _logit_transform_unsupported(model) -> bool:
    config = unwrap(model).config
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", None) not in (None, 1.0)


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The LM head's effective weight, LoRA deltas included (differentiable through them)."""
    weight = head.weight
    if hasattr(head, "lora_A") and not getattr(head, "disable_adapters", False):
        base = getattr(head, "base_layer", head)
        weight = base.weight
        for adapter in head.active_adapters:
            if adapter in head.lora_A:
                weight = weight + head.get_delta_weight(adapter)
    return weight


def _tempered(logits: torch.Tensor, temperature) -> torch.Tensor:
    """`logits / T`, T a float or one value per row (`[M]`, e.g. HAPO's per-token sampling temperatures)."""
    if isinstance(temperature, torch.Tensor):
        return logits / temperature.to(logits.device, logits.dtype)[:, None]
    return logits if temperature == 1.0 else logits / temperature


def _naive_token_logps(hidden, weight, bias, labels, with_entropy: bool, temperature=1.0):
    logits = _tempered(torch.nn.functional.linear(hidden, weight, bias).float(), temperature)
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logps = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logps, entropy


@contextlib.contextmanager
def _head_scores_labels(head: torch.nn.Module, trained: torch.Tensor, labels: torch.Tensor, fused: bool,
                        with_entropy: bool, temperature=1.0):
    """While active, `head(hidden [R, T, H])` returns `[1 or 2, M]`: the log-prob of each label at the
    `trained` positions (and the entropy) under `softmax(logits / temperature)` instead of `[R, T, V]` logits."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[trained]
        weight, bias = head_weight(head), getattr(head, "bias", None)
        if hasattr(weight, "full_tensor"):  # a DTensor shard outside FSDP2's unsharded forward
            weight = weight.full_tensor()
            bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
        if torch.is_autocast_enabled(hidden.device.type):  # what nn.Linear would compute in
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        per_row = isinstance(temperature, torch.Tensor)
        if fused and not (per_row and bias is not None):
            from .kernels import linear_logprobs

            if per_row:  # (h / T) W^T = (h W^T) / T without a bias: the kernel's own temperature is one scalar
                hidden, kernel_temperature = hidden / temperature.to(hidden.device, hidden.dtype)[:, None], 1.0
            else:
                kernel_temperature = temperature
            token_logps, entropy = linear_logprobs(hidden, weight, labels, with_entropy=with_entropy, bias=bias,
                                                   temperature=kernel_temperature)
        else:
            token_logps, entropy = _naive_token_logps(hidden, weight, bias, labels, with_entropy, temperature)
        scores = [token_logps.float()] + ([entropy.float()] if with_entropy else [])
        return torch.stack(scores)

    had_own_forward = "forward" in head.__dict__
    original = head.forward
    head.forward = forward
    try:
        yield
    finally:
        if had_own_forward:
            head.forward = original
        else:
            del head.forward


def _layout(model, batch: SequenceBatch | PackedSequenceBatch):
    """(model inputs, trained positions, their labels, their sequences) of a padded or packed batch. A
    packed batch names its positions (a shared prompt's last one predicts several completions)."""
    if isinstance(batch, PackedSequenceBatch):
        from .packed_attention import model_inputs

        positions = (torch.zeros_like(batch.target_positions), batch.target_positions)
        return model_inputs(model, batch), positions, batch.target_labels, batch.target_sequence
    trained = batch.targets != IGNORE
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return inputs, trained, batch.targets[trained], batch.sequence_index[trained]


def _token_logps_from_logits(model, inputs: dict, trained, labels, with_entropy: bool, temperature=1.0):
    """Models that transform logits after the head (soft-capping, logit scale): their own full forward."""
    logits = model(**inputs, use_cache=False).logits
    log_probs = torch.log_softmax(_tempered(logits[trained].float(), temperature), dim=-1)
    token_logps = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logps, entropy


def sequence_logps(model, batch: SequenceBatch | PackedSequenceBatch, *, fused: bool = True,
                   with_entropy: bool = False, temperature: float | torch.Tensor = 1.0) -> SequenceLogps:
    """Forward the model over the batch and sum completion-token log-probs per sequence.

    Log-probs and entropies are of `softmax(logits / temperature)`: a float, or one value per completion
    position `[M]` in the row-major order of `token_logps` (online RL scores each token under the temperature
    it was sampled at)."""
    inputs, trained, labels, sequence = _layout(model, batch)
    if _logit_transform_unsupported(model):
        token_logps, entropy = _token_logps_from_logits(model, inputs, trained, labels, with_entropy, temperature)
    else:
        with _head_scores_labels(output_head(model), trained, labels, fused, with_entropy, temperature):
            scores = model(**inputs, use_cache=False).logits
        token_logps, entropy = scores[0], (scores[1] if with_entropy else None)
    sums = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, sequence, token_logps.float())
    counts = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    counts = counts.index_add(0, sequence, torch.ones_like(token_logps, dtype=torch.float32))
    return SequenceLogps(sums, counts, token_logps.float(), entropy, sequence)
