"""`training.liger_kernels`: RMSNorm, the rotary embedding and SiLU-and-multiply through Liger-Kernel's fused
Triton kernels wherever the decoder runs eagerly on CUDA.

Why: uncompiled, transformers' own pointwise code is several kernels per operation with fp32 intermediates
(RMSNorm: cast, square, mean, rsqrt, two multiplies, cast back; the rotary embedding: rotate_half's two slices,
a negation and a cat, then three more ops, for q and for k; SiLU, then the multiply), forward and backward. At
the Qwen2.5-0.5B shape and L = 4096 that code took about 240 of the 682 ms of an uncompiled step, the same code
TRL runs (benchmarks/RESULTS.md, "Where the uncompiled gap was"). Liger-Kernel, a maintained library of exactly
these kernels (the `[gpu]` extra), does each in one kernel. Compiled layers do not need it: inductor fuses the
same code (287 -> 112 ms there), and an opaque Triton kernel in the graph would only stop that fusion, so `auto`
turns the kernels on where the decoder layers run eagerly: `training.compile: false`, DeepSpeed, the online RL
loop's training forwards, and every reference forward that is not compiled.

How, without touching the model's classes (Liger's own `apply_liger_kernel_to_*` replaces them process-wide):
each RMSNorm and each dense SiLU MLP of the given model gets an instance `forward` (parameters, their names and
the state dict do not change) that calls Liger's function when the input is on CUDA, torch.compile is not
tracing and no CUDA graph is being captured, and the class's own forward otherwise. The rotary embedding is a
function the attention code of each modeling file calls by its module-level name, so that name is replaced, once
per modeling file, by a dispatcher with the same conditions: every model of that type in the process sees it, and
on CPU, in a compiled layer and in fast generation's compiled, graph-captured decode step it runs transformers'
function unchanged.

Numerics: Liger's "llama" casting mode is transformers' RMSNorm (the inverse RMS in fp32, the product cast back,
then the weight); its rotary and SiLU-mul kernels keep fp32 inside the kernel where transformers rounds each
intermediate to bf16, so values differ by bf16 rounding (the GPU tests compare log-probs and gradients with
transformers' code). Model types: those whose RMSNorm has no offset and whose MLP is gate/up/down with SiLU.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ROTARY_NAME = "apply_rotary_pos_emb"  # the module-level function each supported modeling file's attention calls
_ROTARY_REPLACED: set[str] = set()  # the modeling modules whose rotary function is the dispatcher


def liger_available() -> bool:
    """Whether Liger's functions import (an installed liger-kernel without a working Triton does not): checked at
    setup, so a broken install turns `auto` off instead of failing at the first forward."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means the kernels cannot run here
        return False
    return True


def liger_decision(setting, *, device_type: str, compiled: bool, model_type: str | None) -> tuple[bool, str]:
    """(use Liger's kernels?, why) for `training.liger_kernels` = True / False / "auto". True where they cannot run
    is the user's error (exit 2, before anything is written); auto then says why it left them off."""
    if setting is False:
        return False, "training.liger_kernels: false"
    if device_type != "cuda":
        missing = "a CUDA device (Liger's kernels are Triton kernels for GPUs)"
    elif not liger_available():
        missing = ("liger-kernel, which is not installed or does not import (pip install liger-kernel, or this "
                   "package's [gpu] extra)")
    elif model_type not in SUPPORTED_MODEL_TYPES:
        missing = f"a model type in {', '.join(SUPPORTED_MODEL_TYPES)} (this model is {model_type!r})"
    else:
        missing = None
    if setting is True:
        if missing is not None:
            raise UserError(f"training.liger_kernels: true needs {missing}. Set training.liger_kernels: auto (on "
                            f"where they can run) or false.")
        return True, "training.liger_kernels: true"
    if compiled:
        return False, "auto: the decoder layers are compiled (inductor fuses the same code)"
    if missing is not None:
        return False, f"auto: needs {missing}"
    return True, "auto: CUDA, decoder layers run eagerly"


def _fusable(tensor: torch.Tensor) -> bool:
    """Liger's kernel for this call: on CUDA, outside torch.compile's tracing and outside CUDA-graph capture (fast
    generation's decode step keeps transformers' code there; the order keeps the capture query out of traces)."""
    if torch.compiler.is_compiling() or not tensor.is_cuda:
        return False
    return not torch.cuda.is_current_stream_capturing()


def _norm_forward(norm, hidden: torch.Tensor) -> torch.Tensor:
    if _fusable(hidden):
        from liger_kernel.transformers.functional import liger_rms_norm

        # in_place=False: Liger's default writes dX over the incoming gradient, safe only while no other node
        # holds that buffer; the copy costs one [tokens, hidden] tensor for the length of the norm's backward.
        return liger_rms_norm(hidden, norm.weight, norm.variance_epsilon, 0.0, "llama", False)
    return type(norm).forward(norm, hidden)


def _mlp_forward(mlp, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not args and not kwargs and _fusable(hidden):
        from liger_kernel.transformers.functional import liger_swiglu

        return mlp.down_proj(liger_swiglu(mlp.gate_proj(hidden), mlp.up_proj(hidden)))
    return type(mlp).forward(mlp, hidden, *args, **kwargs)


def _rotary_dispatcher(original):
    def rotary(q, k, cos, sin, *args, **kwargs):
        if not args and not kwargs and _fusable(q):
            from liger_kernel.transformers.functional import liger_rope

            return liger_rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    rotary.align_original = original
    return rotary


def _is_plain_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None
            and hasattr(module, "variance_epsilon"))


def _is_silu_mlp(module, config) -> bool:
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) in ("silu", "swish"))


def use_liger_kernels(model) -> dict:
    """Route `model`'s RMSNorms, SiLU MLPs and its modeling file's rotary embedding through Liger's kernels (see
    the module's docstring). Idempotent. Returns what it changed, for summary.json."""
    from .models import decoder, unwrap

    body = decoder(model)
    config = unwrap(model).config
    norms = mlps = 0
    for module in body.modules():
        if _is_plain_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            norms += 1
        elif _is_silu_mlp(module, config):
            module.forward = types.MethodType(_mlp_forward, module)
            mlps += 1
    # every layer's attention comes from the same modeling file
    modeling = sys.modules[type(body.layers[0].self_attn).__module__]
    current = getattr(modeling, _ROTARY_NAME, None)
    if current is None:
        return {"norms": norms, "mlps": mlps, "rotary": []}
    if not hasattr(current, "align_original"):
        setattr(modeling, _ROTARY_NAME, _rotary_dispatcher(current))
        _ROTARY_REPLACED.add(modeling.__name__)
    return {"norms": norms, "mlps": mlps, "rotary": [modeling.__name__]}


def restore_rotary() -> None:
    """Put transformers' rotary functions back where `use_liger_kernels` replaced them: for a process that goes on
    to run another trainer's models after ours (the side-by-side benchmark runs TRL next), and for tests."""
    while _ROTARY_REPLACED:
        modeling = sys.modules[_ROTARY_REPLACED.pop()]
        setattr(modeling, _ROTARY_NAME, getattr(modeling, _ROTARY_NAME).align_original)
