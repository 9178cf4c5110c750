"""Regional `torch.compile` of the decoder layers: whether a run compiles (`training.compile`), how, and the
fallback when compiling fails.

Each decoder layer is compiled on its own (regional compilation): the layers share one graph, so compiling
costs one layer's time, and activation checkpointing and FSDP2 still wrap each layer. `auto` (the default)
compiles the pairwise trainer (and so every APO / Curry stage) on CUDA, where it measured +20-50% tokens/s
(benchmarks/RESULTS.md, DPO vs TRL), and nowhere else: on CPU inductor's C++ build costs more than it saves;
under DeepSpeed the engine wraps the module and the combination is unmeasured. `true` compiles wherever asked;
`false` never. The online RL loop does not compile its training forward (its fast generation compiles its own
decode step).

Compilation happens at a layer's first call. If it fails there (dynamo cannot trace the layer, the backend
fails), every layer of that model goes back to its eager forward, the call is run eagerly, a warning says why,
and summary.json's `compile` records it: a run never stops because the compiler did. Inductor's caches live
in `~/.cache/align/inductor` (or `TORCHINDUCTOR_CACHE_DIR`), so a second run of the same shapes skips most of
the compilation. `ALIGN_COMPILE_BACKEND` picks another torch.compile backend (`aot_eager` in the CPU tests).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

CACHE_DIR = Path("~/.cache/align/inductor")


def compile_decision(setting, *, device_type: str, engine: str) -> tuple[bool, str]:
    """(compile?, why) for the pairwise trainer's `training.compile` = True / False / "auto" on this device and
    engine (`distributed.engine_name`)."""
    if setting is True:
        return True, "training.compile: true"
    if setting is False:
        return False, "training.compile: false"
    if device_type != "cuda":
        return False, "auto: compiled on CUDA only (on CPU inductor's build costs more than it saves)"
    if engine.startswith("zero"):
        return False, "auto: not under DeepSpeed (unmeasured there; training.compile: true compiles anyway)"
    return True, "auto: CUDA"


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing compilation raises: dynamo's errors (tracing, backend failures wrap the backend's own) and
    inductor's."""
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError
    except ImportError:  # pragma: no cover - older torch
        pass
    else:
        errors.append(InductorError)
    return tuple(errors)


def describe(error: BaseException) -> str:
    """One line: the error's type and first line, and the backend's own error that dynamo wrapped in it."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__

    inner = getattr(error, "inner_exception", None)
    return (line(error) + (f" ({line(inner)})" if inner is not None else ""))[:300]


class CompiledLayers:
    """The decoder layers of one model, each compiled in place, falling back together to eager on a failure."""

    def __init__(self, layers, backend: str | None = None):
        import torch

        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # inductor reads it when it first writes
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR.expanduser())
        self.backend = backend or os.environ.get("ALIGN_COMPILE_BACKEND", "inductor")
        self.layers = list(layers)
        self.error: str | None = None
        self._errors = compile_errors()
        for layer in self.layers:
            # As nn.Module.compile does (Module.__call__ runs `_compiled_call_impl` when set), behind the fallback.
            compiled = torch.compile(layer._call_impl, backend=self.backend)
            layer._compiled_call_impl = functools.partial(self._call, layer, compiled)

    def _call(self, layer, compiled, *args, **kwargs):
        if self.error is None:
            try:
                return compiled(*args, **kwargs)
            except self._errors as error:
                self.fall_back(error)
        return layer._call_impl(*args, **kwargs)

    def fall_back(self, error: BaseException) -> None:
        self.error = describe(error)
        for layer in self.layers:
            layer._compiled_call_impl = None
        warnings.warn(f"torch.compile of the decoder layers failed ({self.error}); the run goes on uncompiled "
                      f"(training.compile: false skips the attempt).", stacklevel=2)

    def report(self) -> dict:
        return {"backend": self.backend, "fell_back": self.error}


def compile_layers(model, backend: str | None = None) -> CompiledLayers:
    """Compile each decoder layer of `model` in place (see the module's docstring)."""
    from .models import decoder

    return CompiledLayers(decoder(model).layers, backend)
