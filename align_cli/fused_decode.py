"""Fused decode layers: fast generation's decode step at a small batch as seven Triton kernels a layer.

At the batch of an RL step (grpo.yaml's 32 rollouts) the compiled decode step is bound by the fixed cost of its
~12 kernels a layer, not by reading the weights (`decode_kernels.py` says where the time went). This module runs
the decoder layers of a decode step as `decode_kernels`' seven kernels instead of the model's code, for the
architectures whose layer is the llama one (pre-norm RMSNorm, rotary attention with grouped key/value heads,
SiLU-gated MLP, two residual adds): llama, mistral, qwen2, qwen3 (with its per-head q/k norms). The final norm
is a kernel too (with the final norm module's weight); the embedding, the LM head and the sampling stay the
model's modules (the head and the sampling compiled as before: `fast_generation._decode_tail`).

The layer's weights are the live module's parameters (q/k/v and gate/up from `fused_projections`' concatenated
copies of them, made at the start of each call), so online RL decodes the policy's current weights. The rotary
cos/sin of every position of the call come from the model's own rotary module once per call.

`layer_blocker` says why a model cannot take this path (anything that is not that layer: LoRA-wrapped or
quantised projections, other activations, position-dependent rope types, odd head sizes); those keep the
model's code. `reference_layer` is the same layer in torch ops, rounding where transformers' eager code rounds:
it runs where Triton cannot (CPU tests force it with `ALIGN_FAST_LAYERS=1`), and the GPU tests check the kernels
against it (and both against float32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import decode_kernels
from .fused_projections import FusedLinear

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MAX_BATCH = 64          # the kernels hold a whole batch in one tile; larger batches are bound by the GEMMs anyway
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")  # cos/sin change with the sequence length: no per-call table


def mode() -> str:
    """`ALIGN_FAST_LAYERS`: `auto` (the kernels on CUDA where `layer_blocker` allows), `1` (also on CPU, as
    `reference_layer`), `0` (never)."""
    value = os.environ.get("ALIGN_FAST_LAYERS", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off"}.get(value, "auto")


@dataclass
class LayerWeights:
    """One decoder layer's tensors (views of the live parameters, or `fused_projections`' copies)."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor            # [(H + 2 KVH) * HD, D]: q, k, v rows
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3's per-head RMSNorm weights
    k_norm: torch.Tensor | None
    head_eps: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    gate_up: torch.Tensor        # [2I, D]: gate rows, then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    scale: float                 # the attention's softmax scale
    cache_layer: int             # its keys and values in the slot cache


@dataclass
class DecodePlan:
    """What a fused decode step of one model needs: its layers, the modules around them, the rotary table."""

    layers: list[LayerWeights]
    embed: torch.nn.Module
    norm: torch.nn.Module
    head: torch.nn.Module
    cos: torch.Tensor            # [max_len, HD] in the model's dtype, as its rotary module computes them
    sin: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    kernels: bool                # decode_kernels (CUDA) or reference_layer (torch ops)


def _norm_parts(module) -> tuple[torch.Tensor, float] | None:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or eps is None or getattr(module, "bias", None) is not None:
        return None
    return weight, float(eps)


def layer_blocker(body, config) -> str | None:
    """Why `body`'s layers (under `fused_projections`) cannot run as the fused decode layer, or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"model type {model_type!r} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} (the kernels compute SiLU)"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type")) in _POSITION_DEPENDENT_ROPE:
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} depends on the sequence length"
    if getattr(body, "rotary_emb", None) is None:
        return "no model-level rotary embedding module"
    if _norm_parts(getattr(body, "norm", None)) is None:
        return "the final norm is not an RMSNorm (weight, variance_epsilon)"
    for index, layer in enumerate(body.layers[: config.num_hidden_layers]):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            return f"layer {index} has no self_attn / mlp"
        head_dim = getattr(attention, "head_dim", 0)
        if head_dim < 32 or head_dim & (head_dim - 1):
            return f"head_dim {head_dim} (the kernels need a power of two >= 32)"
        if type(getattr(attention, "q_proj", None)) is not FusedLinear or type(
                getattr(mlp, "gate_proj", None)) is not FusedLinear:
            return f"layer {index}: q/k/v and gate/up are not fused (LoRA-wrapped or quantised projections)"
        if type(attention.o_proj) is not torch.nn.Linear or type(mlp.down_proj) is not torch.nn.Linear:
            return f"layer {index}: o_proj / down_proj are not plain nn.Linear"
        if _norm_parts(layer.input_layernorm) is None or _norm_parts(layer.post_attention_layernorm) is None:
            return f"layer {index}: its norms are not RMSNorm (weight, variance_epsilon)"
        head_norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
        if any(norm is not None for norm in head_norms) and not all(
                norm is not None and _norm_parts(norm) is not None for norm in head_norms):
            return f"layer {index}: per-head norms other than q_norm and k_norm RMSNorms"
    return None


def build_plan(body, head, config, max_len: int, cache_offset: int, kernels: bool) -> DecodePlan:
    """The plan of `body` (its layers' keys and values at `cache_offset + layer` of the slot cache)."""
    layers = []
    for index, layer in enumerate(body.layers[: config.num_hidden_layers]):
        attention, mlp = layer.self_attn, layer.mlp
        input_norm, input_eps = _norm_parts(layer.input_layernorm)
        post_norm, post_eps = _norm_parts(layer.post_attention_layernorm)
        q_norm = getattr(attention, "q_norm", None)
        k_norm = getattr(attention, "k_norm", None)
        layers.append(LayerWeights(
            input_norm=input_norm, input_eps=input_eps,
            qkv=attention.q_proj.weight, qkv_bias=attention.q_proj.bias,
            q_norm=q_norm.weight if q_norm is not None else None,
            k_norm=k_norm.weight if k_norm is not None else None,
            head_eps=float(q_norm.variance_epsilon) if q_norm is not None else 0.0,
            o=attention.o_proj.weight, o_bias=attention.o_proj.bias,
            post_norm=post_norm, post_eps=post_eps,
            gate_up=mlp.gate_proj.weight, gate_up_bias=mlp.gate_proj.bias,
            down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias,
            scale=float(attention.scaling), cache_layer=cache_offset + index))
    first = body.layers[0].self_attn
    weight = body.embed_tokens.weight
    positions = torch.arange(max_len, device=weight.device)[None]
    with torch.no_grad():
        cos, sin = body.rotary_emb(torch.empty(1, max_len, 1, device=weight.device, dtype=weight.dtype), positions)
    kv_heads = config.num_key_value_heads
    return DecodePlan(layers, body.embed_tokens, body.norm, head, cos[0].contiguous(), sin[0].contiguous(),
                      heads=first.q_proj.sizes[0] // first.head_dim, kv_heads=kv_heads, head_dim=first.head_dim,
                      intermediate=body.layers[0].mlp.gate_proj.sizes[0], kernels=kernels)


# ------------------------------------------------------------------------------------- the layer in torch ops

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistic, normalised activations rounded before the weight's product."""
    normalised = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normalised.float()).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float32, rounded once (as the kernel and inductor's fusion do)."""
    low, high = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-high, low], dim=-1)
    return (x.float() * cos.float() + rotated * sin.float()).to(x.dtype)


def reference_layer(plan: DecodePlan, weights: LayerWeights, h: torch.Tensor, positions: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor) -> None:
    """One decoder layer of a decode step in torch ops, updating `h` `[B, D]` in place and writing this step's
    keys and values at `positions` of slots 0..B-1 of `keys` / `values` `[slots, KVH, max_len, HD]`."""
    batch, dtype = h.shape[0], h.dtype
    heads, kv_heads, head_dim = plan.heads, plan.kv_heads, plan.head_dim
    qkv = F.linear(_rms_norm(h, weights.input_norm, weights.input_eps), weights.qkv, weights.qkv_bias)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(batch, -1, head_dim) for t in (q, k, v))
    if weights.q_norm is not None:
        q, k = _rms_norm(q, weights.q_norm, weights.head_eps), _rms_norm(k, weights.k_norm, weights.head_eps)
    cos, sin = plan.cos[positions][:, None], plan.sin[positions][:, None]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    rows = torch.arange(batch, device=h.device)
    keys[rows, :, positions] = k
    values[rows, :, positions] = v
    visible = (torch.arange(keys.shape[2], device=h.device)[None, :] <= positions[:, None])[:, None, None, :]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    attended = F.scaled_dot_product_attention(grouped, keys[:batch], values[:batch], attn_mask=visible,
                                              scale=weights.scale).reshape(batch, heads * head_dim)
    h.copy_((h.float() + F.linear(attended, weights.o, weights.o_bias).float()).to(dtype))
    gate, up = F.linear(_rms_norm(h, weights.post_norm, weights.post_eps), weights.gate_up,
                        weights.gate_up_bias).chunk(2, dim=-1)
    activated = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)
    h.copy_((h.float() + F.linear(activated, weights.down, weights.down_bias).float()).to(dtype))


def _kernel_hidden(plan: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """`decode_hidden` as `decode_kernels`' seven launches a layer (and the final norm's)."""
    h = plan.embed(tokens).contiguous()
    other, normed = torch.empty_like(h), torch.empty_like(h)
    batch, hidden = h.shape
    tiles = decode_kernels.TILES
    splits = decode_kernels.splits_of
    float32 = dict(dtype=torch.float32, device=h.device)
    qkv_partials = torch.empty(splits(hidden, tiles["qkv"]), batch, plan.layers[0].qkv.shape[0], **float32)
    attended = h.new_empty(batch, plan.heads * plan.head_dim)
    o_partials = torch.empty(splits(attended.shape[1], tiles["o"]), batch, hidden, **float32)
    activated = h.new_empty(batch, plan.intermediate)
    down_partials = torch.empty(splits(plan.intermediate, tiles["down"]), batch, hidden, **float32)
    pending, pending_bias = None, None
    for weights in plan.layers:
        keys, values = cache.keys[weights.cache_layer], cache.values[weights.cache_layer]
        decode_kernels.residual_norm(h, pending, pending_bias, weights.input_norm, weights.input_eps, other, normed)
        if pending is not None:
            h, other = other, h
        decode_kernels.linear_partial(normed, weights.qkv, qkv_partials, tiles["qkv"])
        decode_kernels.attention(qkv_partials, weights.qkv_bias, weights.q_norm, weights.k_norm, weights.head_eps,
                                 plan.cos, plan.sin, positions, keys, values, attended, plan.heads, weights.scale)
        decode_kernels.linear_partial(attended, weights.o, o_partials, tiles["o"])
        decode_kernels.residual_norm(h, o_partials, weights.o_bias, weights.post_norm, weights.post_eps, other, normed)
        h, other = other, h
        decode_kernels.gated_linear(normed, weights.gate_up, weights.gate_up_bias, activated, tiles["gate_up"])
        decode_kernels.linear_partial(activated, weights.down, down_partials, tiles["down"])
        pending, pending_bias = down_partials, weights.down_bias
    norm_weight, norm_eps = _norm_parts(plan.norm)
    decode_kernels.residual_norm(h, pending, pending_bias, norm_weight, norm_eps, other, normed)
    return normed


def decode_hidden(plan: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The final norm's output `[B, D]` for one token per slot 0..B-1 (what the LM head takes); writes each
    layer's keys and values at `positions` of slots 0..B-1."""
    if plan.kernels:
        return _kernel_hidden(plan, tokens, positions, cache)
    h = plan.embed(tokens).contiguous()
    for weights in plan.layers:
        reference_layer(plan, weights, h, positions, cache.keys[weights.cache_layer], cache.values[weights.cache_layer])
    return plan.norm(h)


def kernels_can_run(device: torch.device) -> bool:
    return decode_kernels.AVAILABLE and (device.type == "cuda" or decode_kernels.interpreting())
