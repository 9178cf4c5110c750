"""Fast generation: every sequence of a call decoded together over a preallocated KV cache, with
continuous batching and a CUDA-graph-captured decode step (torch and transformers only).

What it does, and why:
- All `P x G` sequences of a call share one set of cache *slots* (`[layers, slots, kv_heads, max_len, head_dim]`,
  allocated once; as many slots as a KV-token budget allows). A prompt is prefilled once and its keys and
  values copied to the slots of its G samples. When a sequence stops, its slot is refilled from the queue at
  the next check (every `CHECK_EVERY` steps), so early-EOS rows do not hold the batch; once the queue is empty
  the live sequences are moved into the lowest slots and a graph of a smaller batch takes over.
- The model is the transformers module itself (the live policy, current weights, LoRA layers active): its
  attention implementation is switched for the call to `align_fast`, which writes this step's keys and
  values into the slots and attends over them (`_attention`); everything else (embeddings, rotary
  positions, MLPs, norms) is the model's own code.
- The decode step (model forward to the LM head, sampling, bookkeeping) is compiled by torch.compile
  (inductor, fullgraph; `Compile`, `ALIGN_FAST_COMPILE`, by default on CUDA) and then captured once per batch
  size as a CUDA graph and replayed, so a step costs one launch instead of ~1,700 host-side ones, and the
  replay runs a few fused kernels instead of ~1,700 small ones (71 a layer: norm casts, rotary, SiLU, adds);
  on an H200 at 512 sequences that took the step from ~8.8 to ~4.8 ms. Compilation costs ~35-50 s per
  process for the first batch size and once more for the first other one (shapes turn dynamic); a step
  whose compilation fails runs uncompiled. The host looks at the slots every `CHECK_EVERY` steps.
- At a small batch (steps of at most `fused_decode.MAX_BATCH` slots, RL's usual case) the decoder layers of the
  step run as `fused_decode`'s Triton kernels instead of the model's code (`ALIGN_FAST_LAYERS`, by default on
  CUDA for llama-family layers with fused projections); what is compiled is then the LM head and the sampling.
- Sampling is exact: temperature, then top-p with transformers' `TopPLogitsWarper` rule, then one draw from the
  categorical by inverse CDF. The draw's uniform number is a counter-based hash of (seed, prompt index,
  sample index, position), so a sequence's tokens depend on its seed and index only, never on the batch
  it ran in or its slot (up to the arithmetic of different batch shapes).
- It returns each token's log-prob under the sampling distribution and under softmax(z / T) (the
  quantity the trainer recomputes), so the two sides can be checked against each other.

`blocker(model, processors)` says why a request must take the slow path (transformers `generate`)
instead: an architecture outside `SUPPORTED_MODEL_TYPES`, sharded parameters (FSDP2 DTensors or DeepSpeed
ZeRO-3, whose weights exist only gathered inside each module's forward, in lock-step across ranks), a
generation config that adds processors this path does not run (repetition penalty and the like), or any
caller's logits processor without a fast equivalent: those callers keep `generate`. Two have one: HAPO's
adaptive temperature (`AdaptiveSampling`, computed inside the decode step, its factors and entropies recorded
per token) and APO's extrapolated logits (`fast_generate(extrapolation=(previous, alpha))`: the previous model
decoded in step, its keys and values in the same slots after the policy's layers; `partner_blocker`).
`ALIGN_FAST_GENERATION` picks the default: `auto` (fast on CUDA when not blocked), `1` (also on CPU), `0` (never).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused_decode
from .fused_projections import fusable_groups, fuse_projections, fused_bytes, worth_fusing
from .losses.hapo import EntropyStats, normalise_entropy
from .models import decoder, output_head, unwrap

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ATTENTION_NAME = "align_fast"
LAYER_ATTRIBUTE = "_align_fast_layer"  # set on a partner's attention modules: its layers' slot-cache index
CHECK_EVERY = 8            # decode steps between looks at which sequences finished (one host sync each)
PREFILL_TOKENS = 16384     # prompt tokens per prefill forward
TOP_P_CANDIDATES = 1024    # top-p looks at the top-k first; the full sort runs only when they hold < top_p
MIN_GRAPH_BATCH = 8
CDF_CHUNK = 512            # tokens per chunk of the two-level inverse CDF (`inverse_cdf`)
_MASK32 = 0xFFFFFFFF

# The generation-config fields whose processors `generate` would add and this path does not run, with the
# value that means "off".
_UNSUPPORTED_GENERATION_FIELDS = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "min_p": None, "diversity_penalty": 0.0,
}


def mode() -> str:
    value = os.environ.get("ALIGN_FAST_GENERATION", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off"}.get(value, "auto")


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def blocker(model, processors=()) -> str | None:
    """Why `model` (with these logits processors) cannot take the fast path, or None when it can."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or (model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention layers"
    if _is_sharded(inner):
        return "parameters are sharded (FSDP2 / ZeRO-3): generate gathers them inside each module's forward"
    generation_config = getattr(inner, "generation_config", None)
    for field, off in _UNSUPPORTED_GENERATION_FIELDS.items():
        value = getattr(generation_config, field, off)
        if value is not None and value != off:
            return f"generation_config.{field}={value!r} adds a processor the fast path does not run"
    for processor in processors:
        if callable(getattr(processor, "fast_sampling", None)):
            continue  # HAPO's adaptive temperature: `Sampling.adaptive` does the same inside the decode step
        if callable(getattr(processor, "fast_partner", None)):  # APO's extrapolation: a partner model in step
            reason = partner_blocker(inner, processor.fast_partner()[0])
            if reason is not None:
                return reason
            continue
        return (f"logits processor {type(processor).__name__}: processors see `generate`'s batch rows (APO's "
                f"extrapolation holds a second model's cache laid out like them), which continuous batching does "
                f"not keep")
    return None


def partner_blocker(model, partner) -> str | None:
    """Why `partner` cannot be decoded in step with `model` (`fast_generate(extrapolation=...)`), or None: it must
    take the fast path itself and lay its keys and values out as the policy's do (same heads, head size)."""
    inner = unwrap(partner)
    reason = blocker(inner)
    if reason is not None:
        return f"the extrapolation's previous model: {reason}"

    def layout(config):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim

    if layout(inner.config) != layout(unwrap(model).config):
        return "the extrapolation's previous model has another key/value layout (heads, head size)"
    return None


def wanted(model, processors=()) -> bool:
    """Whether a generating call on `model` takes the fast path by default (`ALIGN_FAST_GENERATION`)."""
    chosen = mode()
    if chosen == "off" or blocker(model, processors) is not None:
        return False
    device = next(unwrap(model).parameters()).device
    return chosen == "on" or device.type == "cuda"


# ----------------------------------------------------------------------------------------------- sampling

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors; products wrap, and the mask keeps the low 32 bits."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sequence_keys(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sequence from (seed, prompt index, sample index)."""
    base = _mix32(torch.full_like(prompt_index, seed & _MASK32) ^ 0x5BD1E995)
    return _mix32(_mix32(base ^ prompt_index) + sample_index * 0x9E3779B9)


def uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per sequence for the token at `positions` (24 bits, float32)."""
    bits = _mix32(keys ^ _mix32(positions * 0x85EBCA6B + 0x27D4EB2F))
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' `TopPLogitsWarper` rule: drop the tokens whose ascending cumulative probability is
    <= 1 - top_p (the least likely first), keeping at least the most likely one. Looks at the top
    `TOP_P_CANDIDATES` first; the full-vocabulary sort runs only for a step where they hold < top_p."""
    if top_p >= 1.0:
        return logits
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    mass = (values - log_total).exp().cumsum(-1)
    if k < logits.shape[-1] and bool((mass[:, -1] < top_p).any()):
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        return logits.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    # Descending rank r is kept iff the mass strictly before it is < top_p (the ascending rule, reversed).
    before = mass - (values - log_total).exp()
    keep = before < top_p
    keep[:, 0] = True
    filtered = torch.full_like(logits, -float("inf"))
    return filtered.scatter(1, indices, values.masked_fill(~keep, -float("inf")))


def inverse_cdf(probabilities: torch.Tensor, u: torch.Tensor, chunk: int = CDF_CHUNK) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds `u * total`: a draw from the
    categorical. In two levels, chunk sums then one chunk's scan, because a scan along a 150k-token row is a
    long serial chain on the GPU (measured ~3 ms a step, whatever the batch) while these are short ones."""
    rows, vocabulary = probabilities.shape
    chunks = -(-vocabulary // chunk)
    padded = F.pad(probabilities, (0, chunks * chunk - vocabulary)).view(rows, chunks, chunk)
    sums = padded.sum(-1)                                      # [rows, chunks]
    chunk_cdf = sums.cumsum(-1)
    target = u[:, None] * chunk_cdf[:, -1:]
    # a chunk with mass: the first whose cumulative sum exceeds the target (never an empty one)
    which = torch.searchsorted(chunk_cdf, target, right=True).clamp_(max=chunks - 1)
    residual = target - (chunk_cdf.gather(1, which) - sums.gather(1, which))
    inside = padded.gather(1, which[:, :, None].expand(-1, -1, chunk)).squeeze(1).cumsum(-1)
    # rounding may put the residual at or past the chunk's own total: stay below it, on a token with mass
    residual = torch.minimum(residual.clamp(min=0), torch.nextafter(inside[:, -1:], torch.zeros_like(inside[:, -1:])))
    offset = torch.searchsorted(inside, residual, right=True).clamp_(max=chunk - 1)
    return (which * chunk + offset).squeeze(1).clamp_(max=vocabulary - 1)


@dataclass(frozen=True)
class AdaptiveSampling:
    """HAPO's adaptive temperature on the fast path (align_cli/rl/temperature.py holds the `generate` one and
    says why): each token is drawn at `T * (1 + tau * ht)`, `ht` the untempered next-token entropy normalised
    by the previous step's `stats` (`losses.hapo.normalise_entropy`); `stats` None: factor 1, records only.
    The decode step reads the numbers from one device tensor (`parameters`), so a new step's statistics reuse
    the compiled and captured step (python floats would be compiled in as constants)."""

    tau: float
    sign: str = "paper"
    stats: object = None   # losses.hapo.EntropyStats or None

    def parameters(self, device) -> torch.Tensor:
        """[quantile, scale, positive_max, negative_min, tau] (tau 0 without statistics: factor exactly 1)."""
        if self.stats is None:
            return torch.tensor([0.0, 1.0, 1.0, -1.0, 0.0], dtype=torch.float32, device=device)
        s = self.stats
        return torch.tensor([s.quantile, s.scale, s.positive_max, s.negative_min, self.tau], dtype=torch.float32,
                            device=device)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    adaptive: AdaptiveSampling | None = None


def adaptive_factors(logits: torch.Tensor, parameters: torch.Tensor, sign: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO's per-row temperature factor `1 + tau * ht` and the untempered entropy it came from, computed as the
    `generate` path's processor computes them (softmax in float32, `entr`, `normalise_entropy`)."""
    entropy = torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(dim=-1)
    quantile, scale, positive_max, negative_min, tau = parameters.unbind()
    stats = EntropyStats(quantile, scale, positive_max, negative_min)
    return 1.0 + tau * normalise_entropy(entropy, stats, sign), entropy


def sample_tokens(logits: torch.Tensor, sampling: Sampling, keys: torch.Tensor, positions: torch.Tensor,
                  adaptive: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Next tokens `[B]`, their log-probs under the sampling distribution (top-p included) and under
    softmax(z / T) (what the trainer scores; untempered when greedy), and HAPO's temperature factor and
    untempered entropy per row (ones and zeros without `sampling.adaptive`; `adaptive` holds its
    `parameters`). `logits` `[B, V]` float32 are the model's raw scores."""
    factor = entropy = None
    if sampling.adaptive is not None and sampling.temperature > 0:
        factor, entropy = adaptive_factors(logits, adaptive, sampling.adaptive.sign)
        logits = logits / factor[:, None]   # then the base temperature, in `generate`'s order
    tempered = logits / sampling.temperature if sampling.temperature > 0 else logits
    tempered_logps = tempered - torch.logsumexp(tempered, dim=-1, keepdim=True)
    if sampling.temperature <= 0:
        tokens = logits.argmax(dim=-1)
        sampling_logps = torch.zeros_like(tokens, dtype=torch.float32)
    else:
        scores = top_p_filter(tempered, sampling.top_p)
        probabilities = scores.softmax(dim=-1)
        tokens = inverse_cdf(probabilities, uniforms(keys, positions))
        sampling_logps = probabilities.gather(1, tokens[:, None]).squeeze(1).log()
    if factor is None:
        factor, entropy = torch.ones_like(sampling_logps), torch.zeros_like(sampling_logps)
    return tokens, sampling_logps, tempered_logps.gather(1, tokens[:, None]).squeeze(1), factor, entropy


# ---------------------------------------------------------------------------------------------- attention

class _SlotCache:
    """Keys and values of every slot, one `[slots, kv_heads, max_len, head_dim]` tensor per layer, and what the
    attention function needs to know about the forward running now. One allocation per layer (not views of
    one 5-D tensor) so that a compiled decode step sees each layer's cache as its own input, written in place
    by one `index_put_` (aliased views of one base would be functionalised into copies of the whole cache)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self.prefill_slots: torch.Tensor | None = None   # [n]: the slots the prompts of a prefill write to
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # decode: where each slot writes
        self.arange = torch.arange(max_len, device=device)

    def copy_prefix(self, sources: torch.Tensor, targets: torch.Tensor, length: int) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[targets, :, :length] = keys[sources, :, :length]
            values[targets, :, :length] = values[sources, :, :length]

    def move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[targets] = keys[sources]
            values[targets] = values[sources]


_ACTIVE: _SlotCache | None = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The `align_fast` attention implementation: store this forward's keys and values in the slot cache,
    attend over what the slots hold. Returns `[B, q, heads, head_dim]` like transformers' implementations."""
    cache, layer = _ACTIVE, getattr(module, LAYER_ATTRIBUTE, module.layer_idx)
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len > 1:  # prefill: right-padded prompts, positions 0..q_len-1, causal inside the chunk
        slots = cache.prefill_slots
        cache.keys[layer][slots, :, :q_len] = key
        cache.values[layer][slots, :, :q_len] = value
        groups = heads // kv_heads
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                             value.repeat_interleave(groups, 1), is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    # decode: one token per slot, written at its position; the query heads of a KV head are laid out as that
    # head's query "positions", so one memory-efficient kernel reads each slot's keys once.
    rows = torch.arange(batch, device=query.device)
    positions = cache.positions[:batch]
    keys, values = cache.keys[layer], cache.values[layer]
    keys[rows, :, positions] = key[:, :, 0]  # on the whole layer tensor (rows < batch): one in-place write
    values[rows, :, positions] = value[:, :, 0]
    visible = (cache.arange[None, :] <= positions[:, None])[:, None, None, :]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys[:batch], values[:batch], attn_mask=visible, scale=scaling)
    return out.reshape(batch, 1, heads, head_dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)


@contextlib.contextmanager
def _fast_attention(model, partner=None):
    """The model's attention implementation switched to `align_fast` for the call, restored after; and the
    trainer's regionally compiled layers (`training.compile`, align_cli/compilation.py) run their eager forward
    meanwhile: this path compiles its own decode step, and a layer graph compiled for training shapes would only
    recompile for one-token steps inside it."""
    _register_attention()
    modules = [*model.modules(), *(partner.modules() if partner is not None else ())]
    configs = [m.config for m in modules if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    configs = list({id(c): c for c in configs}.values())
    previous = [c._attn_implementation for c in configs]
    compiled = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None)]
    # The partner (APO's previous model) keeps its keys and values in the same slots, in layers L.. of the cache.
    offset = model.config.num_hidden_layers
    partner_attention = [m for m in partner.modules() if hasattr(m, "layer_idx")] if partner is not None else []
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        for module, _ in compiled:
            module._compiled_call_impl = None
        for module in partner_attention:
            setattr(module, LAYER_ATTRIBUTE, offset + module.layer_idx)
        yield
    finally:
        for c, value in zip(configs, previous):
            c._attn_implementation = value
        for module, call in compiled:
            module._compiled_call_impl = call
        for module in partner_attention:
            delattr(module, LAYER_ATTRIBUTE)


# ------------------------------------------------------------------------------------------------ engine

@dataclass
class FastOutput:
    """Per sequence, prompt-major (sequence `p * G + j` is sample j of prompt p)."""

    tokens: list[list[int]]         # up to and including the first stop token, or max_new_tokens long
    stopped: list[bool]             # ended on a stop token (False: cut at max_new_tokens)
    sampling_logps: list[list[float]]
    tempered_logps: list[list[float]]
    stats: dict
    # With `Sampling.adaptive` (HAPO): per token, the temperature factor it was drawn at and the untempered entropy.
    temperature_factors: list[list[float]] | None = None
    entropies: list[list[float]] | None = None


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def default_kv_budget(config, dtype, device, reserved: int = 0) -> int:
    """KV tokens to preallocate: on CUDA a third of the free memory less `reserved` bytes (the fused
    projections' copies; training state and the sampling buffers share the card); on CPU 64k tokens."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(0, free - reserved) / 3 // kv_bytes_per_token(config, dtype))
    return 1 << 16


def fuse_mode() -> str:
    """`ALIGN_FAST_FUSE`: `auto` (fuse q/k/v and gate/up on CUDA when the copies fit, `fused_projections`),
    `1` (also on CPU), `0` (never)."""
    value = os.environ.get("ALIGN_FAST_FUSE", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off"}.get(value, "auto")


def _fusing(fuse: bool | None, device, *models) -> tuple[bool, int]:
    """Whether this call fuses its projections (`fuse`, None: `ALIGN_FAST_FUSE`), and the bytes that takes."""
    groups = [group for model in models if model is not None for group in fusable_groups(model)]
    if fuse is None:
        chosen = fuse_mode()
        fuse = chosen == "on" or (chosen == "auto" and device.type == "cuda" and worth_fusing(groups, device))
    fuse = bool(fuse and groups)
    return fuse, fused_bytes(groups) if fuse else 0


def _decode_forward(body, head, tokens: torch.Tensor, positions: torch.Tensor, masks: dict, after,
                    partner=None) -> torch.Tensor:
    """One decode step: the model's forward for one token per slot, the LM head (combined with the partner's,
    `extrapolate`), then `after(logits)`. A module-level function, so that every call of `fast_generate` (new
    slot tensors, new closures) reuses one compiled graph: dynamo guards on the tensors' shapes and the closures'
    code, not on their identity."""
    def logits_of(body, head):
        hidden = body(input_ids=tokens[:, None], position_ids=positions, attention_mask=masks,
                      use_cache=False).last_hidden_state
        return head(hidden[:, -1]).float()

    logits = logits_of(body, head)
    if partner is not None:
        logits = extrapolate(logits, logits_of(partner.body, partner.head), partner.alpha)
    if after is not None:
        after(logits)
    return logits


def _decode_tail(head, hidden: torch.Tensor, after, partner: tuple | None = None) -> torch.Tensor:
    """The end of a fused-layer decode step (`fused_decode`): the LM head on the final norm's output `[B, D]`
    (and the partner's, `partner` = (head, hidden, alpha), `extrapolate`), then `after(logits)`. Module-level
    for the reason `_decode_forward` is."""
    logits = head(hidden).float()
    if partner is not None:
        partner_head, partner_hidden, alpha = partner
        logits = extrapolate(logits, partner_head(partner_hidden).float(), alpha)
    if after is not None:
        after(logits)
    return logits


def extrapolate(current: torch.Tensor, previous: torch.Tensor, alpha: float) -> torch.Tensor:
    """APO's sampling logits `(1+alpha) z_current - alpha z_previous` over the vocabulary both heads share (the
    rest of a padded head is kept), as `iterative.extrapolation.ExtrapolatedLogits` computes them in `generate`."""
    vocabulary = min(current.shape[-1], previous.shape[-1])
    shared = (1.0 + alpha) * current[:, :vocabulary] - alpha * previous[:, :vocabulary]
    return torch.cat([shared, current[:, vocabulary:]], dim=-1) if vocabulary < current.shape[-1] else shared


@dataclass(frozen=True)
class Partner:
    """A second model decoded in step with the policy (APO's previous checkpoint): its body and head, and alpha."""

    body: torch.nn.Module
    head: torch.nn.Module
    alpha: float


def compile_mode() -> str:
    """`ALIGN_FAST_COMPILE`: `auto` (compile the decode step on CUDA), `1` (also on CPU), `0` (never),
    `autotune` (on CUDA, with inductor's GEMM autotuning: `AUTOTUNE`), `combo` (on CUDA, with inductor's
    horizontal fusion: `COMBO`)."""
    value = os.environ.get("ALIGN_FAST_COMPILE", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off",
            "autotune": "autotune", "max-autotune": "autotune", "combo": "combo"}.get(value, "auto")


@functools.lru_cache(maxsize=None)
def _compiled_forward(backend, mode: str | None, options: tuple = (), function=_decode_forward):
    """`function` (`_decode_forward`, or `_decode_tail` for fused layers) under torch.compile, one wrapper per
    (backend, mode, options, function). fullgraph: a graph break would
    leave the step as several graphs with Python between them; failing loudly lets the caller fall back to
    the uncompiled step instead. Shapes: static at the first batch size, automatically dynamic from the second
    on (one more compile covers every smaller batch and every slot length, where `dynamic=False` would compile
    each batch bucket and each prompt length of an RL run anew and soon hit dynamo's recompile limit)."""
    extra = {"options": dict(options)} if options else {}  # torch.compile takes a mode or options, not both
    return torch.compile(function, backend=backend, mode=mode, fullgraph=True, **extra)


@dataclass(frozen=True)
class Compile:
    """How the decode step is compiled before capture: inductor fuses the ~70 small kernels a layer (norm
    casts, rotary, SiLU-and-multiply, residual adds, the cache writes) into a few."""

    backend: object = "inductor"   # a torch.compile backend: its name or a callable
    mode: str | None = None   # None: inductor's default (no autotuning: tens of seconds, not minutes)
    options: tuple = ()       # inductor config (name, value) pairs, with mode None (torch.compile's `options`)


# Inductor's GEMM autotuning (Triton templates against cuBLAS, with fused epilogues) without its own CUDA graphs:
# the step is captured whole by `_DecodeStep` instead.
AUTOTUNE = Compile(mode="max-autotune-no-cudagraphs")
# Fewer launches per step at a small batch, where the step is launch-bound (benchmarks/RESULTS.md, call 6: ~400
# kernels of ~3.5 us): combo kernels put independent pointwise / reduction kernels (the k and v cache writes,
# q and k rotary) into one launch; aggressive fusion fuses nodes that share no buffer read.
COMBO = Compile(options=(("combo_kernels", True), ("aggressive_fusion", True)))


class _DecodeStep:
    """One decode step of slots [0, batch): the model's forward to the logits, then `after(logits)` (sampling
    and bookkeeping, when they need no host sync). Eager or compiled (`compile`), then captured as a CUDA graph
    and replayed: a replay launches the whole step at once, where eager PyTorch pays ~1,700 host-side launches
    a step. Compilation and capture need warm-up runs; `state` (tensors `after` changes) is put back after each,
    so they leave no trace (the keys and values they write lie past each slot's position and are overwritten
    before read). A step whose compilation fails runs uncompiled (`compile_error` says why). With `plans`
    (the policy's and the partner's `fused_decode.DecodePlan`) the decoder layers run as the fused decode
    kernels (the final norm too), outside the compiled part, which is then the LM head and `after` (`_decode_tail`)."""

    def __init__(self, body, head, cache: _SlotCache, tokens: torch.Tensor, batch: int, layer_types, graph: bool,
                 after=None, state=(), pool=None, compile: Compile | None = None, partner: Partner | None = None,
                 plans: tuple | None = None):
        self.body, self.head, self.cache, self.batch, self.after = body, head, cache, batch, after
        self.partner, self.plans = partner, plans
        self.tokens = tokens[:batch]
        self.masks = {name: None for name in layer_types}
        self.graph, self.error = None, None
        self.layers_error = None
        if plans is not None:
            try:  # the first launches compile the Triton kernels; a failure leaves the model's layer code
                for plan in plans:
                    if plan is not None:
                        fused_decode.decode_hidden(plan, self.tokens, cache.positions[:batch], cache)
                if cache.positions.is_cuda:
                    torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 - any kernel failure: the model's layers still run
                self.plans, self.layers_error = None, f"{type(error).__name__}: {error}"[:300]
        eager = _decode_forward if self.plans is None else _decode_tail
        self.forward, self.compile_error, self.compile_seconds = eager, None, 0.0
        saved = [t.clone() for t in state]

        def restore():
            for t, value in zip(state, saved):
                t.copy_(value)

        if compile is not None:
            compiled = _compiled_forward(compile.backend, compile.mode, compile.options, eager)
            began = time.perf_counter()
            try:
                self.forward = compiled
                self._run()   # compiles (or finds this shape's graph compiled by an earlier call)
                if graph:
                    torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 - any compiler failure: the uncompiled step still runs
                self.forward, self.compile_error = eager, f"{type(error).__name__}: {error}"[:300]
            finally:
                restore()
            self.compile_seconds = time.perf_counter() - began
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run()
                    restore()
            torch.cuda.current_stream().wait_stream(stream)
            try:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.logits = self._run()
            except RuntimeError as error:  # a model whose forward cannot be captured still runs, eagerly
                self.graph, self.error = None, f"{type(error).__name__}: {error}"[:200]

    def _run(self) -> torch.Tensor:
        positions = self.cache.positions[: self.batch]
        if self.plans is None:
            return self.forward(self.body, self.head, self.tokens, positions[:, None], self.masks, self.after,
                                self.partner)
        plan, partner_plan = self.plans
        hidden = fused_decode.decode_hidden(plan, self.tokens, positions, self.cache)
        partner = None
        if partner_plan is not None:
            partner = (partner_plan.head, fused_decode.decode_hidden(partner_plan, self.tokens, positions, self.cache),
                       self.partner.alpha)
        return self.forward(plan.head, hidden, self.after, partner)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def _fused_plans(requested: bool | None, device, graphs: bool, models: list, max_len: int) -> tuple[tuple | None, str]:
    """This call's `fused_decode` plans (the policy's, and the partner's or None), or None; and why. `requested`:
    `fast_generate(fused_layers=...)` (None: `ALIGN_FAST_LAYERS`). `models`: (body, head, config) of the policy
    and of the partner, whose keys and values follow the policy's layers in the slot cache."""
    chosen = fused_decode.mode() if requested is None else ("on" if requested else "off")
    if chosen == "off":
        return None, "off (ALIGN_FAST_LAYERS=0 or fused_layers=False)"
    kernels = fused_decode.kernels_can_run(device)
    if chosen == "auto" and not (kernels and graphs):
        return None, "auto: the kernels run on CUDA with Triton, in captured decode steps"
    plans, offset = [], 0
    for body, head, config in models:
        reason = fused_decode.layer_blocker(body, config)
        if reason is not None:
            return None, reason
        plans.append(fused_decode.build_plan(body, head, config, max_len, offset, kernels))
        offset += config.num_hidden_layers
    plans += [None] * (2 - len(plans))
    return tuple(plans), "on: " + ("Triton kernels" if kernels else "torch ops (fused_decode.reference_layer)")


def _graph_sizes(slots: int) -> list[int]:
    sizes, size = [], slots
    while size >= MIN_GRAPH_BATCH:
        sizes.append(size)
        size //= 2
    return sizes or [slots]


@torch.no_grad()
def fast_generate(model, prompts: list[list[int]], num_samples: int, max_new_tokens: int, sampling: Sampling,
                  stop_ids, *, kv_token_budget: int | None = None, cuda_graph: bool | None = None,
                  max_slots: int | None = None, lengths: list[int] | None = None,
                  compile_step: bool | Compile | None = None, extrapolation: tuple | None = None,
                  fuse: bool | None = None, fused_layers: bool | None = None) -> FastOutput:
    """`num_samples` completions of each prompt (token ids) under `sampling`. `lengths` (benchmarks):
    per sequence, a number of new tokens after which it ends as if it had sampled a stop token.
    `extrapolation` = (previous model, alpha): APO's sampler, logits `(1+alpha) z - alpha z_previous` at every
    step (`extrapolate`), the previous model decoded in step with its keys and values in the same slots.
    `compile_step`: compile the decode step before capture (None: `ALIGN_FAST_COMPILE`, by default on CUDA;
    a `Compile` picks backend and mode). Steps that need a host decision (top-p < 1 when sampling) stay
    eager and uncompiled. `fuse`: q/k/v and gate/up as one GEMM each (`fused_projections`; None:
    `ALIGN_FAST_FUSE`, by default on CUDA when the copies fit). `fused_layers`: decode steps of at most
    `fused_decode.MAX_BATCH` slots run the decoder layers as `fused_decode`'s kernels (None: `ALIGN_FAST_LAYERS`,
    by default on CUDA where the layers are the llama layer and the projections are fused)."""
    global _ACTIVE
    inner = unwrap(model)
    config = inner.config
    body, head = decoder(model), output_head(model)
    device = next(inner.parameters()).device
    dtype = head.weight.dtype
    total = len(prompts) * num_samples
    if total == 0:
        return FastOutput([], [], [], [], {})
    max_prompt = max(len(p) for p in prompts)
    max_len = -(-(max_prompt + max_new_tokens) // 16) * 16  # mask rows aligned for the fused attention kernels
    partner_model = unwrap(extrapolation[0]) if extrapolation is not None else None
    layers_asked = fused_layers or (fused_layers is None and fused_decode.mode() == "on")
    if fuse is None and device.type != "cuda" and layers_asked:
        fuse = True  # the fused layers take q/k/v and gate/up from the fused copies (CUDA fuses them by default)
    fusing, reserved = _fusing(fuse, device, inner, partner_model)
    budget = kv_token_budget if kv_token_budget is not None else default_kv_budget(config, dtype, device, reserved)
    partner = None
    if partner_model is not None:
        partner = Partner(decoder(partner_model), output_head(partner_model), float(extrapolation[1]))
        budget //= 2  # each token's keys and values twice: the policy's and the partner's
    slots = max(1, min(total, budget // max_len, max_slots or total))
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if compile_step is None:
        chosen = compile_mode()
        if chosen in ("autotune", "combo") and device.type == "cuda":
            compile_step = AUTOTUNE if chosen == "autotune" else COMBO
        else:
            compile_step = chosen == "on" or (chosen in ("auto", "autotune", "combo") and device.type == "cuda")
    compile_options = Compile() if compile_step is True else (compile_step or None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    layers = config.num_hidden_layers + (partner_model.config.num_hidden_layers if partner_model is not None else 0)
    cache = _SlotCache(layers, slots, kv_heads, max_len, head_dim, dtype, device)
    layer_types = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    caps = torch.full((total,), max_new_tokens, dtype=torch.long)
    if lengths is not None:
        caps = torch.tensor(lengths, dtype=torch.long).clamp(1, max_new_tokens)

    all_prompt = torch.arange(total) // num_samples
    all_keys = sequence_keys(sampling.seed, all_prompt, torch.arange(total) % num_samples).to(device)
    # per-slot state (device): the sequence it holds, its key, tokens so far, its cap, whether it runs
    slot_sequence = torch.full((slots,), -1, dtype=torch.long, device=device)
    slot_key = torch.zeros(slots, dtype=torch.long, device=device)
    slot_count = torch.zeros(slots, dtype=torch.long, device=device)
    slot_cap = torch.ones(slots, dtype=torch.long, device=device)
    slot_live = torch.zeros(slots, dtype=torch.bool, device=device)
    slot_stopped = torch.zeros(slots, dtype=torch.bool, device=device)
    last_tokens = torch.zeros(slots, dtype=torch.long, device=device)
    out_tokens = torch.zeros(slots, max_new_tokens, dtype=torch.long, device=device)
    out_sampling = torch.zeros(slots, max_new_tokens, dtype=torch.float32, device=device)
    out_tempered = torch.zeros(slots, max_new_tokens, dtype=torch.float32, device=device)
    adaptive = sampling.adaptive.parameters(device) if sampling.adaptive is not None else None
    out_factor = torch.ones(slots, max_new_tokens, dtype=torch.float32, device=device)
    out_entropy = torch.zeros(slots, max_new_tokens, dtype=torch.float32, device=device)
    rows = torch.arange(slots, device=device)

    results_tokens: list = [None] * total
    results_stopped = [False] * total
    results_sampling: list = [None] * total
    results_tempered: list = [None] * total
    results_factor: list = [None] * total
    results_entropy: list = [None] * total
    pending = list(range(total))  # prompt-major order: a prompt's samples are admitted together
    free = list(range(slots))
    held: dict[int, int] = {}     # slot -> sequence (host mirror)
    stats = {"slots": slots, "prefill_forwards": 0, "decode_steps": 0, "checks": 0, "graphs": 0, "moves": 0}

    def record(sequence_slots: list[int], logits: torch.Tensor) -> None:
        """Sample the first token of freshly prefilled slots from their prompt's logits `[n, V]`."""
        index = torch.tensor(sequence_slots, dtype=torch.long, device=device)
        _store(index, *sample_tokens(logits, sampling, slot_key[index], slot_count[index], adaptive))

    def _store(index, chosen, s_logp, p_logp, factor, entropy) -> None:
        # Rows that no longer run (finished, free) sample garbage: their outputs stay as they were.
        live = slot_live[index]
        where = slot_count[index].clamp(max=max_new_tokens - 1)
        out_tokens[index, where] = torch.where(live, chosen, out_tokens[index, where])
        out_sampling[index, where] = torch.where(live, s_logp, out_sampling[index, where])
        out_tempered[index, where] = torch.where(live, p_logp, out_tempered[index, where])
        out_factor[index, where] = torch.where(live, factor, out_factor[index, where])
        out_entropy[index, where] = torch.where(live, entropy, out_entropy[index, where])
        stopped = torch.isin(chosen, stops)
        slot_stopped[index] = slot_stopped[index] | (stopped & live)
        slot_count[index] = slot_count[index] + live.long()
        slot_live[index] = live & ~stopped & (slot_count[index] < slot_cap[index])
        last_tokens[index] = chosen
        cache.positions[index] = (cache.positions[index] + live.long()).clamp(max=max_len - 1)

    def admit() -> None:
        """Fill free slots from the queue: prefill each distinct prompt once, copy it to its samples' slots."""
        nonlocal free
        if not pending or not free:
            return
        take = pending[: len(free)]
        del pending[: len(take)]
        assigned, free = free[: len(take)], free[len(take):]
        for slot, sequence in zip(assigned, take):
            held[slot] = sequence
        index = torch.tensor(assigned, dtype=torch.long, device=device)
        sequences = torch.tensor(take, dtype=torch.long)
        slot_sequence[index] = sequences.to(device)
        slot_key[index] = all_keys[sequences.to(device)]
        slot_count[index] = 0
        slot_cap[index] = caps[sequences].to(device)
        slot_live[index] = True
        slot_stopped[index] = False
        groups: dict[int, list[int]] = {}
        for slot, sequence in zip(assigned, take):
            groups.setdefault(sequence // num_samples, []).append(slot)
        order = list(groups)
        start = 0
        while start < len(order):  # prefill forwards of at most PREFILL_TOKENS padded tokens
            width = len(prompts[order[start]])
            end = start
            while end < len(order):
                width_next = max(width, len(prompts[order[end]]))
                if end > start and width_next * (end - start + 1) > PREFILL_TOKENS:
                    break
                width, end = width_next, end + 1
            chunk = order[start:end]
            logits = _prefill(chunk, [groups[p][0] for p in chunk], width)
            first_slots, repeats = [], []
            for prompt in chunk:
                targets = groups[prompt]
                if len(targets) > 1:
                    cache.copy_prefix(torch.tensor([targets[0]] * (len(targets) - 1), device=device),
                                      torch.tensor(targets[1:], device=device), len(prompts[prompt]))
                first_slots.extend(targets)
                repeats.append(len(targets))
            # the first sampled token is fed at position len(prompt); `_store` moves each slot one on
            cache.positions[torch.tensor(first_slots, device=device)] = torch.tensor(
                [len(prompts[p]) - 1 for p in chunk for _ in groups[p]], device=device)
            record(first_slots, logits.repeat_interleave(torch.tensor(repeats, device=device), dim=0))
            start = end

    def _prefill(chunk: list[int], target_slots: list[int], width: int) -> torch.Tensor:
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, : len(prompts[prompt])] = torch.tensor(prompts[prompt])
        ids = ids.to(device)
        cache.prefill_slots = torch.tensor(target_slots, dtype=torch.long, device=device)
        positions = torch.arange(width, device=device)[None, :].expand(len(chunk), -1)
        last = torch.tensor([len(prompts[p]) - 1 for p in chunk], device=device)
        stats["prefill_forwards"] += 1

        def logits_of(body, head):
            hidden = body(input_ids=ids, position_ids=positions, attention_mask={name: None for name in layer_types},
                          use_cache=False).last_hidden_state
            return head(hidden[torch.arange(len(chunk), device=device), last]).float()

        logits = logits_of(body, head)
        if partner is not None:
            logits = extrapolate(logits, logits_of(partner.body, partner.head), partner.alpha)
        return logits

    def harvest() -> None:
        """Copy finished slots' outputs to the host and free the slots."""
        nonlocal free
        live = slot_live.cpu().tolist()
        done = [slot for slot in held if not live[slot]]
        if not done:
            return
        index = torch.tensor(done, dtype=torch.long, device=device)
        counts = slot_count[index].cpu().tolist()
        stopped = slot_stopped[index].cpu().tolist()
        tokens = out_tokens[index].cpu()
        s_logp, p_logp = out_sampling[index].cpu(), out_tempered[index].cpu()
        factors, entropies = out_factor[index].cpu(), out_entropy[index].cpu()
        for row, slot in enumerate(done):
            sequence = held.pop(slot)
            n = counts[row]
            results_tokens[sequence] = tokens[row, :n].tolist()
            results_sampling[sequence] = s_logp[row, :n].tolist()
            results_tempered[sequence] = p_logp[row, :n].tolist()
            results_factor[sequence] = factors[row, :n].tolist()
            results_entropy[sequence] = entropies[row, :n].tolist()
            results_stopped[sequence] = bool(stopped[row])
        free = sorted(free + done)

    def compact(batch: int) -> int:
        """Move the live slots into [0, n) (queue empty); the smallest graph batch that holds them."""
        nonlocal free
        live_slots = sorted(held)
        size = next(s for s in reversed(sizes) if s >= len(live_slots)) if live_slots else sizes[-1]
        if size >= batch:
            return batch
        movers = [s for s in live_slots if s >= size]
        targets = [s for s in range(size) if s not in held][: len(movers)]
        if movers:
            src = torch.tensor(movers, device=device)
            dst = torch.tensor(targets, device=device)
            cache.move(src, dst)
            for state in (slot_sequence, slot_key, slot_count, slot_cap, slot_live, slot_stopped, last_tokens,
                          cache.positions, out_tokens, out_sampling, out_tempered, out_factor, out_entropy):
                state[dst] = state[src]
            slot_live[src] = False
            for a, b in zip(movers, targets):
                held[b] = held.pop(a)
            stats["moves"] += len(movers)
        free = [s for s in range(slots) if s not in held]
        return size

    def _sample_and_store(batch: int):
        index = rows[:batch]

        def after(logits):
            _store(index, *sample_tokens(logits, sampling, slot_key[:batch], slot_count[:batch], adaptive))

        return after

    state = (slot_count, slot_live, slot_stopped, last_tokens, cache.positions)
    sizes = _graph_sizes(slots)
    steps: dict[int, _DecodeStep] = {}
    layer_batches: list[int] = []   # the batch sizes whose steps run the fused decode layers
    pool = torch.cuda.graph_pool_handle() if cuda_graph else None
    previous, _ACTIVE = _ACTIVE, cache
    was_training = inner.training
    inner.eval()
    partner_was_training = partner_model.training if partner_model is not None else False
    if partner_model is not None:
        partner_model.eval()
    try:
        with _fast_attention(inner, partner_model), \
                (fuse_projections(inner, partner_model) if fusing else contextlib.nullcontext(0)) as fused:
            stats["fused_groups"] = fused
            models = [(body, head, config)]
            if partner is not None:
                models.append((partner.body, partner.head, partner_model.config))
            plans, stats["fused_layers"] = _fused_plans(fused_layers, device, bool(cuda_graph), models, max_len)
            admit()
            batch = slots
            while True:
                harvest()
                admit()
                if not held:  # admit leaves nothing pending while slots are free
                    break
                if not pending:
                    batch = compact(batch)
                if batch not in steps:
                    # top-p < 1 may need a host-side decision (full sort or not): that step stays eager
                    static = sampling.temperature <= 0 or sampling.top_p >= 1
                    fused_here = plans is not None and static and batch <= fused_decode.MAX_BATCH
                    steps[batch] = _DecodeStep(body, head, cache, last_tokens, batch, layer_types,
                                               cuda_graph and static, _sample_and_store(batch), state, pool,
                                               compile_options if static else None, partner,
                                               plans if fused_here else None)
                    layer_batches += [batch] if steps[batch].plans is not None else []
                    if steps[batch].layers_error:
                        stats["fused_layers_error"] = steps[batch].layers_error
                    stats["graphs"] += int(steps[batch].graph is not None)
                    if steps[batch].error:
                        stats["graph_error"] = steps[batch].error
                    if compile_options is not None and static:
                        stats["compiled"] = stats.get("compiled", 0) + int(steps[batch].compile_error is None)
                        stats["compile_seconds"] = round(stats.get("compile_seconds", 0.0)
                                                         + steps[batch].compile_seconds, 3)
                        if steps[batch].compile_error:
                            stats["compile_error"] = steps[batch].compile_error
                step = steps[batch]
                for _ in range(CHECK_EVERY):
                    step()
                stats["decode_steps"] += CHECK_EVERY
                stats["checks"] += 1
    finally:
        _ACTIVE = previous
        inner.train(was_training)
        if partner_model is not None:
            partner_model.train(partner_was_training)
    stats["graph_batches"] = sorted(steps)
    stats["fused_layer_batches"] = sorted(layer_batches)
    recorded = sampling.adaptive is not None
    return FastOutput(results_tokens, results_stopped, results_sampling, results_tempered, stats,
                      results_factor if recorded else None, results_entropy if recorded else None)

