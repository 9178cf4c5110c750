"""Chunked torch implementation of linear -> log-prob (+ entropy), for devices without Triton.

The logits `z = (hidden @ weight.T + bias) / temperature` are only ever built one
`[token_chunk, vocab_chunk]` tile at a time, in float32. The forward folds each tile into an online
log-sum-exp (running max, sum of exp, sum of exp * z) and picks up the label's logit, so it keeps O(N)
state. The backward recomputes every tile, turns it into the gradient of the logits, and accumulates
dH, dW (and dbias) in float32. Both directions have the same memory bound as the Triton kernels.

All labels reaching this module are valid vocabulary ids: the caller (`linear_logprobs`) drops the
ignored positions before the LM head.
"""

from __future__ import annotations

import torch

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def logit_tile(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv_temp: float):
    """`(hidden @ weight.T + bias) * inv_temp` in float32, whatever the input dtype."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    return z * inv_temp


def fold_tile(state: dict, z: torch.Tensor, local_labels: torch.Tensor, with_entropy: bool) -> None:
    """Fold one logits tile into the running (max, sum exp, sum exp*z, target) of its rows, in place."""
    new_max = torch.maximum(state["max"], z.amax(dim=1))
    # The first tile rescales from -inf: exp(-inf) = 0 wipes the empty sums, which is what we want.
    rescale = torch.exp(state["max"] - new_max)
    e = torch.exp(z - new_max[:, None])
    state["sum_exp"] = state["sum_exp"] * rescale + e.sum(dim=1)
    if with_entropy:
        state["sum_exp_z"] = state["sum_exp_z"] * rescale + (e * z).sum(dim=1)
    state["max"] = new_max
    width = z.shape[1]
    inside = (local_labels >= 0) & (local_labels < width)
    picked = z.gather(1, local_labels.clamp(0, width - 1)[:, None]).squeeze(1)
    state["target"] = state["target"] + torch.where(inside, picked, torch.zeros_like(picked))


def finish(state: dict, with_entropy: bool):
    """Turn the folded statistics into (logprobs, entropy or None, lse)."""
    lse = state["max"] + torch.log(state["sum_exp"])
    logprobs = state["target"] - lse
    # H = -sum p log p = lse - sum p z
    entropy = lse - state["sum_exp_z"] / state["sum_exp"] if with_entropy else None
    return logprobs, entropy, lse


def grad_logits(z, lse, entropy, local_labels, grad_logprobs, grad_entropy, inv_temp):
    """d(loss)/d(raw logits) for one tile, given the upstream per-token gradients (either may be None)."""
    log_p = z - lse[:, None]
    p = torch.exp(log_p)
    grad = torch.zeros_like(z)
    if grad_logprobs is not None:
        # d log p_label / dz_j = 1[j = label] - p_j
        cols = torch.arange(z.shape[1], device=z.device)
        onehot = (cols[None, :] == local_labels[:, None]).to(z.dtype)
        grad = grad + grad_logprobs[:, None] * (onehot - p)
    if grad_entropy is not None:
        # dH / dz_j = -p_j (log p_j + H)
        grad = grad - grad_entropy[:, None] * p * (log_p + entropy[:, None])
    # z = logits / T, so every logit gradient carries a factor 1/T.
    return grad * inv_temp


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, with_entropy, temperature, token_chunk, vocab_chunk):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        lse = torch.empty_like(logprobs)
        for n0 in range(0, n, token_chunk):
            rows = slice(n0, min(n0 + token_chunk, n))
            h = hidden[rows]
            state = {
                "max": torch.full((h.shape[0],), float("-inf"), device=h.device),
                "sum_exp": torch.zeros(h.shape[0], device=h.device),
                "sum_exp_z": torch.zeros(h.shape[0], device=h.device),
                "target": torch.zeros(h.shape[0], device=h.device),
            }
            for v0 in range(0, vocab, vocab_chunk):
                cols = slice(v0, min(v0 + vocab_chunk, vocab))
                z = logit_tile(h, weight[cols], None if bias is None else bias[cols], inv_temp)
                fold_tile(state, z, labels[rows] - v0, with_entropy)
            lp, ent, ls = finish(state, with_entropy)
            logprobs[rows], lse[rows] = lp, ls
            if with_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if with_entropy else lse)
        ctx.config = (with_entropy, inv_temp, token_chunk, vocab_chunk)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        with_entropy, inv_temp, token_chunk, vocab_chunk = ctx.config
        if not with_entropy:
            grad_entropy = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8
        n, vocab = hidden.shape[0], weight.shape[0]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        for n0 in range(0, n, token_chunk):
            rows = slice(n0, min(n0 + token_chunk, n))
            h = hidden[rows]
            g_lp = None if grad_logprobs is None else grad_logprobs[rows].float()
            g_ent = None if grad_entropy is None else grad_entropy[rows].float()
            for v0 in range(0, vocab, vocab_chunk):
                cols = slice(v0, min(v0 + vocab_chunk, vocab))
                z = logit_tile(h, weight[cols], None if bias is None else bias[cols], inv_temp)
                g = grad_logits(z, lse[rows], entropy[rows], labels[rows] - v0, g_lp, g_ent, inv_temp)
                if need_h:
                    dh[rows] += g @ weight[cols].float()
                if need_w:
                    dw[cols] += g.t() @ h.float()
                if need_b:
                    db[cols] += g.sum(dim=0)
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None, None, None, None, None,
        )


def single_tile_logprobs(hidden, weight, labels, bias, with_entropy: bool, temperature: float):
    """When all logits fit in one tile's budget, plain autograd over that one fp32 tile is within
    the memory bound and faster on CPU than recomputing it in a custom backward."""
    log_probs = torch.log_softmax(logit_tile(hidden, weight, bias, 1.0 / temperature), dim=-1)
    logprobs = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logprobs, entropy


def chunked_linear_logprobs(
    hidden, weight, labels, bias=None, *, with_entropy=False, temperature=1.0,
    token_chunk=TOKEN_CHUNK, vocab_chunk=VOCAB_CHUNK,
):
    """Torch path for valid labels only; see `align_cli.kernels.linear_logprobs` for the contract.

    The tile budget is `token_chunk * vocab_chunk` elements: with fewer tokens than `token_chunk`
    (a CPU micro-batch of short completions) the vocabulary chunk widens to fill it, which keeps the
    same memory bound and saves the per-chunk overhead that otherwise dominates on small inputs."""
    if labels.numel() * weight.shape[0] <= token_chunk * vocab_chunk:
        return single_tile_logprobs(hidden, weight, labels, bias, with_entropy, float(temperature))
    rows_per_tile = max(1, min(labels.numel(), token_chunk))
    vocab_chunk = max(vocab_chunk, (token_chunk * vocab_chunk) // rows_per_tile)
    return ChunkedLinearLogprobs.apply(
        hidden, weight, bias, labels, with_entropy, float(temperature), token_chunk, vocab_chunk
    )
