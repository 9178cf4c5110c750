"""Per-sequence log-prob sums of completion tokens, from a model and a `SequenceBatch`.

Only the positions that predict a completion token reach the LM head, and with the fused kernel
(`align_cli.kernels.linear_logprobs`) the `[tokens, vocab]` logits are never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.batching import IGNORE, SequenceBatch
from .models import decoder, output_head, unwrap


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


def _naive_token_logps(hidden, head, labels, with_entropy: bool):
    logits = head(hidden).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logps = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logps, entropy


def sequence_logps(model, batch: SequenceBatch, *, fused: bool = True, with_entropy: bool = False) -> SequenceLogps:
    """Forward the model over the batch and sum completion-token log-probs per sequence."""
    hidden = decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            use_cache=False).last_hidden_state
    trained = batch.targets != IGNORE
    hidden = hidden[trained]
    labels = batch.targets[trained]
    sequence = batch.sequence_index[trained]
    head = output_head(model)
    if fused and not _logit_transform_unsupported(model):
        from .kernels import linear_logprobs

        token_logps, entropy = linear_logprobs(hidden, head_weight(head), labels, with_entropy=with_entropy,
                                               bias=getattr(head, "bias", None))
    else:
        token_logps, entropy = _naive_token_logps(hidden, head, labels, with_entropy)
    sums = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, sequence, token_logps.float())
    counts = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    counts = counts.index_add(0, sequence, torch.ones_like(token_logps, dtype=torch.float32))
    return SequenceLogps(sums, counts, token_logps.float(), entropy, sequence)
