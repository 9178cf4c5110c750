"""One GEMM where the model's code runs several on the same input: q/k/v and gate/up, for the fast decode path.

Why: at a small decode batch a step is bound by kernel latency, not by bandwidth. On an H200, Qwen2.5-0.5B
shape, 32 sequences, the compiled and graph-captured step launched 403 kernels (1.42 ms of kernel time, 2.0 ms
a step); the q, k and v GEMMs took 4.2 us each while reading 0.2-1.6 MB (benchmarks/RESULTS.md, "Fused
projections"). One GEMM over the concatenated weights does the three, and one more does gate and up.

How, without touching the model's forward code: for the call, `q_proj` (`gate_proj`) is replaced by a
`FusedLinear` that runs one linear over the concatenated weights, returns its own slice and keeps the others;
`k_proj` and `v_proj` (`up_proj`) are replaced by `_Slice`s that hand those back when the model's code calls
them next on the same input. That order (q, k, v; gate, up, on one input) is what the attention and MLP code of
the architectures the fast path supports does (`fast_generation.SUPPORTED_MODEL_TYPES`; tests check each).

The concatenated weights are a copy taken from the live weights at the start of each call (so decoding uses
the policy's current weights) and freed at its end, so training never holds them. They cost the bytes of the
fused projections (about 75% of a layer's weights): `fuse_projections` skips fusing when that would take more
than `MEMORY_SHARE` of the free memory. The stand-in modules persist between calls (kept per owner module), so a
compiled decode step sees the same modules each call and does not recompile. Only plain `nn.Linear`
projections are fused: LoRA-wrapped or quantised layers keep their own forward (their weights are not one
tensor), which costs the fusion's speed, not correctness.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MEMORY_SHARE = 0.25   # at most this share of the free device memory goes to the fused copies


class FusedLinear(torch.nn.Module):
    """Stands in for the first projection of a group: one linear over the group's concatenated weights."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = sizes
        self.weight: torch.Tensor | None = None   # plain attributes (not parameters): never trained or saved
        self.bias: torch.Tensor | None = None
        self.rest: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.rest = tuple(rest)
        return first


class _Slice(torch.nn.Module):
    """Stands in for a later projection of a group: the slice its `FusedLinear` computed for the same input."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)   # not a submodule: the owner holds it once, as the first one
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.rest[self.index]


_STAND_INS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # owner module -> {group: stand-ins}


def fusable_groups(model) -> list[tuple[torch.nn.Module, tuple[str, ...]]]:
    """(owner module, projection names) for every group whose projections are all plain `nn.Linear` of one
    input size, with biases on all of them or none."""
    groups = []
    for module in model.modules():
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if not all(type(layer) is torch.nn.Linear for layer in layers):
                continue
            if len({layer.in_features for layer in layers}) != 1:
                continue
            if len({layer.bias is None for layer in layers}) != 1:
                continue
            groups.append((module, names))
    return groups


def fused_bytes(groups) -> int:
    return sum(getattr(owner, name).weight.nbytes for owner, names in groups for name in names)


def _stand_ins(owner, names) -> tuple[FusedLinear, list[_Slice]]:
    per_owner = _STAND_INS.setdefault(owner, {})
    if names not in per_owner:
        sizes = [getattr(owner, name).out_features for name in names]
        fused = FusedLinear(sizes)
        per_owner[names] = (fused, [_Slice(fused, index) for index in range(len(names) - 1)])
    return per_owner[names]


def worth_fusing(groups, device: torch.device) -> bool:
    """On CUDA, when the copies fit in `MEMORY_SHARE` of the free memory; elsewhere always (CPU tests)."""
    if not groups:
        return False
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return fused_bytes(groups) <= MEMORY_SHARE * free


@contextlib.contextmanager
def fuse_projections(*models):
    """For the `with` block, each fusable group of `models` runs as one GEMM (module docstring); the original
    projections are put back, and the fused copies freed, on exit."""
    groups = [group for model in models if model is not None for group in fusable_groups(model)]
    swapped = []
    try:
        with torch.no_grad():
            for owner, names in groups:
                layers = [getattr(owner, name) for name in names]
                fused, slices = _stand_ins(owner, names)
                fused.weight = torch.cat([layer.weight for layer in layers])
                fused.bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
                for name, stand_in in zip(names, [fused, *slices]):
                    setattr(owner, name, stand_in)
                swapped.append((owner, names, layers, fused))
        yield len(swapped)
    finally:
        for owner, names, layers, fused in swapped:
            for name, layer in zip(names, layers):
                setattr(owner, name, layer)
            fused.weight = fused.bias = None
            fused.rest = ()
