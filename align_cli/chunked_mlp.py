"""`training.mlp_chunk_tokens`: each decoder layer's MLP runs over chunks of that many tokens, each chunk under
its own activation checkpoint, so backward holds one chunk's MLP intermediates instead of the whole row's.

Why: with gradient checkpointing, what remains above the weights and optimiser states at a step's peak is one
layer's recomputation and backward, and most of it is the MLP's: gate, up, their activated product and the
gradients of the three, each `[tokens, intermediate]` (at Llama-3.2-1B and a 12k-token packed row, 0.2 GiB
apiece; at a 66k-token row of the Qwen2.5-0.5B shape, 0.6 GiB). The MLP is token-wise, so cutting the tokens into
chunks changes no value beyond float rounding (a GEMM over fewer rows may sum in another order); the price is
one more MLP forward per step (each chunk is recomputed in backward). Arctic Long Sequence Training calls this a
tiled MLP; here it is torch's own non-reentrant `checkpoint` per chunk, nested in the layer's checkpoint.

How: the MLP module's `forward` is replaced on the instance (its parameters, their names and the state dict do
not change), and only while gradients are recorded: evaluation, the reference and generation run the original
forward, so a compiled decode step traces it as before. The chunk loop is kept out of `torch.compile`
(`torch._dynamo.disable`): its length follows the row's token count, and traced it would recompile the layer for
every new count; with `training.compile` the layer compiles around the MLP, which runs eagerly. Mixture-of-experts
blocks are left alone (their router and auxiliary losses see all tokens at once).
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint


def _is_dense_mlp(module) -> bool:
    return module is not None and not any(hasattr(module, name) for name in ("experts", "router", "gate_logits"))


@torch._dynamo.disable  # the chunk count follows the token count: traced, every new count would recompile
def _run_in_chunks(forward, chunk_tokens: int, hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [checkpoint(forward, piece, use_reentrant=False) for piece in flat.split(chunk_tokens)]
    return torch.cat(parts).view(*hidden.shape[:-1], -1)


def _chunked_forward(mlp, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound to each changed MLP as its `forward` (a bound method, so a deep copy of the model binds it to the
    copy); the forward it replaced does the work (the class's, or liger_kernels' fused one). An MLP called with
    more than the hidden states runs whole."""
    chunk_tokens = mlp.align_mlp_chunk_tokens
    if not args and not kwargs and torch.is_grad_enabled() and hidden.shape[:-1].numel() > chunk_tokens:
        return _run_in_chunks(mlp.align_mlp_whole_forward, chunk_tokens, hidden)
    return mlp.align_mlp_whole_forward(hidden, *args, **kwargs)


def chunk_mlps(model, chunk_tokens: int | None) -> int:
    """Run each decoder layer's dense MLP of `model` over chunks of `chunk_tokens` tokens while gradients are
    recorded (see the module's docstring); None or 0: nothing. Returns how many MLPs it changed."""
    if not chunk_tokens:
        return 0
    from .models import decoder

    changed = 0
    for layer in decoder(model).layers:
        mlp = getattr(layer, "mlp", None)
        if not _is_dense_mlp(mlp):
            continue
        mlp.align_mlp_chunk_tokens = chunk_tokens
        if getattr(mlp.forward, "__func__", None) is not _chunked_forward:  # chunked once, whatever the calls
            mlp.align_mlp_whole_forward = mlp.forward
            mlp.forward = types.MethodType(_chunked_forward, mlp)
        changed += 1
    return changed
