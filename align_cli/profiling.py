"""`logging.profile_step`: one optimiser step under torch.profiler, summarised per process into
`profile/step-<K>-rank<R>.json`; and the kernel summary the GPU benchmarks share (benchmarks/rollouts.py,
benchmarks/dpo_vs_trl.py --profile-step).

Why a summary and not the trace: a step's Chrome trace is tens to hundreds of MB per process, and the questions
a user asks of it are few: how long the step took, how much of it the GPU was busy, and on what. Kernels are
put in four groups by name: communication (NCCL or gloo collectives: the time several processes pay for
their gradients), matrix products (cuBLAS / CUTLASS / nvjet GEMMs, or aten's mm on CPU), attention (flash,
cuDNN, FlexAttention or SDPA kernels) and the rest. On a CPU run the same is said of the CPU operators' own
time, since there are no kernels. A process's communication share against its compute share is what tells a
several-GPU run's scaling gap from a slow kernel.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

GROUPS = (  # first match wins; names are lower-cased
    ("communication", re.compile(r"nccl|gloo|c10d|allreduce|all_reduce|allgather|all_gather|reduce_scatter|broadcast")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|flex")),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if pattern.search(lowered)), "other")


def _device_us(event) -> float:
    value = getattr(event, "device_time_total", None)
    return getattr(event, "cuda_time_total", 0.0) if value is None else value


def kernel_summary(prof, wall_s: float, steps: int = 1, top: int = 30, on_cpu: bool | None = None) -> dict:
    """A finished torch.profiler run over `steps` steps that took `wall_s` seconds: kernels launched (per step),
    their time against the wall time, the time per group (`GROUPS`) and the `top` kernels by time. `on_cpu`
    (default: no CUDA event was recorded): summarise the CPU operators' own time instead."""
    events = list(prof.key_averages())
    if on_cpu is None:
        on_cpu = not any(_device_us(e) > 0 for e in events)
    rows = []
    for event in events:
        us = event.self_cpu_time_total if on_cpu else _device_us(event)
        if us > 0 and event.count > 0 and not (on_cpu and event.key.startswith("ProfilerStep")):
            rows.append((event.key, event.count, us))
    rows.sort(key=lambda row: -row[2])
    busy_us = sum(us for _, _, us in rows)
    launches = sum(count for _, count, _ in rows)
    groups: dict[str, float] = {}
    for name, _, us in rows:
        group = group_of(name)
        groups[group] = groups.get(group, 0.0) + us
    steps = max(1, steps)
    return {"measured": "cpu operators' own time" if on_cpu else "cuda kernels",
            "wall_s": round(wall_s, 3), "kernel_s": round(busy_us / 1e6, 3),
            "gpu_busy": round(busy_us / 1e6 / wall_s, 3) if wall_s > 0 and not on_cpu else None,
            "kernels": launches, "kernels_per_step": round(launches / steps, 1),
            "mean_kernel_us": round(busy_us / max(1, launches), 2), "steps": steps,
            "groups_s": {group: round(us / 1e6, 4) for group, us in sorted(groups.items(), key=lambda g: -g[1])},
            "top": [{"name": name[:90], "group": group_of(name), "count": count, "us": round(us, 1),
                     "us_each": round(us / count, 2)} for name, count, us in rows[:top]]}


class StepProfiler:
    """Profiles step `index` of a loop when `index` is not None: `begin(k)` before and `end(k)` after each step k
    (numbered as the loop numbers them); then `summary` is `kernel_summary` of that step (None until it ran).
    CUDA kernels where CUDA is available, else the CPU operators."""

    def __init__(self, index: int | None):
        self.index, self.summary, self._prof, self._started = index, None, None, 0.0

    def begin(self, step: int) -> None:
        if self.index is None or step != self.index:
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self._prof = profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
        self._prof.__enter__()
        self._started = time.perf_counter()

    def end(self, step: int) -> dict | None:
        if self._prof is None or step != self.index:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        self.summary, self._prof = kernel_summary(self._prof, wall), None
        return self.summary


class RunStepProfile(StepProfiler):
    """`logging.profile_step` of a training run: the summary of that optimiser step (1-based, as metrics.jsonl
    numbers steps) written by every process to `<run>/profile/step-<K>-rank<R>.json`."""

    def __init__(self, run_dir: Path, step: int | None, rank: int):
        super().__init__(step)
        self.path = Path(run_dir) / "profile" / f"step-{step}-rank{rank}.json"

    def end(self, step: int) -> dict | None:
        summary = super().end(step)
        if summary is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(".json.tmp")
            staging.write_text(json.dumps(summary, indent=1))
            staging.replace(self.path)  # whole or absent
        return summary


# ------------------------------------------------------------------------------------------------ memory

# Where an allocation is charged: its innermost Python frame in one of these (torch's own frames say less than
# the model or trainer line that called them). Backward kernels run on autograd's thread, which has no Python
# frame unless a custom Function's backward is Python: those allocations are `AUTOGRAD`.
OWN_FRAMES = ("align_cli", "logprob_kernels", "losses", "transformers", "trl", "peft", "benchmarks",
              "torch/optim", "torch/utils/checkpoint", "accelerate")
AUTOGRAD = "<backward kernels (autograd's thread, no Python frame)>"
BEFORE = "<allocated before recording (weights, optimiser states, ...)>"


def charged_frame(frames: list[dict]) -> str:
    """`file:line function` of the innermost frame in `OWN_FRAMES` (frames innermost first, as torch records
    them), else the innermost frame, else `AUTOGRAD`."""
    chosen = next((f for f in frames if any(part in f.get("filename", "") for part in OWN_FRAMES)), None)
    chosen = chosen or (frames[0] if frames else None)
    if chosen is None:
        return AUTOGRAD
    path = chosen.get("filename", "?").replace("\\", "/")
    short = "/".join(path.split("/")[-2:])
    return f"{short}:{chosen.get('line', '?')} {chosen.get('name', '?')}"


def peak_breakdown(events: list[dict], allocated_before: int, top: int = 15) -> dict:
    """What was live at the peak of a recorded allocation trace (`torch.cuda.memory._snapshot()["device_traces"]`
    of one device): the peak in GiB, the bytes live then per `charged_frame`, and the allocation that reached it.

    `allocated_before` is `torch.cuda.memory_allocated()` when recording began: those blocks have no event; a
    free of an address the trace never allocated comes out of them. Frees count when completed (what
    `memory_allocated` counts)."""
    def replay(stop: int | None):
        live, total, before, peak, at = {}, allocated_before, allocated_before, allocated_before, -1
        for index, event in enumerate(events):
            if stop is not None and index > stop:
                break
            action, address, size = event.get("action"), event.get("addr"), event.get("size", 0)
            if action == "alloc":
                live[address] = (size, event.get("frames", []))
                total += size
            elif action == "free_completed":
                if address in live:
                    total -= live.pop(address)[0]
                else:
                    total, before = total - size, before - size
            if total > peak:
                peak, at = total, index
        return live, before, peak, at

    _, _, peak, at = replay(None)
    live, before, _, _ = replay(at) if at >= 0 else ({}, allocated_before, 0, -1)
    charged: dict[str, int] = {BEFORE: before}
    for size, frames in live.values():
        key = charged_frame(frames)
        charged[key] = charged.get(key, 0) + size
    rows = sorted(charged.items(), key=lambda item: -item[1])
    reached_by = charged_frame(events[at].get("frames", [])) if at >= 0 else None
    rest = sum(size for _, size in rows[top:])
    return {"peak_bytes": peak, "peak_gib": round(peak / 2**30, 3), "events": len(events), "peak_event": at,
            "reached_by": reached_by,
            "live": [{"where": where, "bytes": size, "gib": round(size / 2**30, 3)} for where, size in rows[:top]],
            "rest_bytes": rest, "rest_gib": round(rest / 2**30, 3)}


class MemoryPeak:
    """Records CUDA allocations (Python stacks) over loop steps `first`..`last` (`begin(k)` / `end(k)` around each
    step, as `StepProfiler`), then `summary` is `peak_breakdown` of them. Nothing on CPU or when `first` is None.
    `baseline`: bytes allocated before the measured run began, left out of the before-recording bucket (so the
    peak compares with a benchmark's `max_memory_allocated - baseline`). Recording slows the steps it covers: the
    benchmarks run them after the timed ones. A step that fails while recording: `fail(error)` stops recording
    and says why in `summary` (torch 2.11 raises a SystemError when a compiled region runs inside activation
    checkpointing while allocations are recorded, pytorch/pytorch#179536)."""

    MAX_EVENTS = 2_000_000

    def __init__(self, first: int | None, last: int | None = None, baseline: int = 0):
        self.first, self.last, self.baseline = first, first if last is None else last, baseline
        self.summary, self._before, self._on = None, 0, False

    @property
    def recording(self) -> bool:
        return self._on

    def fail(self, error: BaseException) -> None:
        if self._on:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._on = False
        self.summary = {"error": f"{type(error).__name__}: {error}"[:300]}

    def begin(self, step: int) -> None:
        if self.first is None or step != self.first or not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        self._before = torch.cuda.memory_allocated() - self.baseline
        torch.cuda.memory._record_memory_history(max_entries=self.MAX_EVENTS, stacks="python", clear_history=True)
        self._on = True

    def end(self, step: int) -> dict | None:
        if not self._on or step != self.last:
            return None
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self._on = False
        traces = snapshot.get("device_traces", [])
        events = traces[torch.cuda.current_device()] if traces else []
        self.summary = peak_breakdown(events, self._before)
        self.summary["truncated"] = len(events) >= self.MAX_EVENTS
        return self.summary
