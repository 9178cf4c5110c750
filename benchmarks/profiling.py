"""Kernel profiles for the GPU benchmarks (not a test): what a profiled stretch launched on the GPU, how long its
kernels ran against the wall time, and which kernels took the most. Tells latency-bound steps (many short
kernels, the GPU idle between them) from bandwidth- or compute-bound ones, and where two trainers' steps differ."""

from __future__ import annotations

import time

import torch


def kernel_summary(prof, wall_s: float, steps: int = 1, top: int = 30) -> dict:
    """The summary of a finished torch.profiler run over `steps` steps that took `wall_s` seconds."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:  # older torch
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0 and event.count > 0:
            rows.append((event.key, event.count, device_us))
    rows.sort(key=lambda row: -row[2])
    kernel_us = sum(us for _, _, us in rows)
    launches = sum(count for _, count, _ in rows)
    steps = max(1, steps)
    return {"wall_s": round(wall_s, 3), "kernel_s": round(kernel_us / 1e6, 3),
            "gpu_busy": round(kernel_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
            "kernels": launches, "kernels_per_step": round(launches / steps, 1),
            "mean_kernel_us": round(kernel_us / max(1, launches), 2), "steps": steps,
            "top": [{"name": name[:90], "count": count, "us": round(us, 1), "us_each": round(us / count, 2)}
                    for name, count, us in rows[:top]]}


class StepProfiler:
    """Profiles step `index` of a loop (CUDA kernels only) when `index` is not None: call `begin(k)` before and
    `end(k)` after each step k; `summary` is then `kernel_summary` of that step (None until it ran)."""

    def __init__(self, index: int | None):
        self.index, self.summary, self._prof, self._started = index, None, None, 0.0

    def begin(self, step: int) -> None:
        if self.index is None or step != self.index or not torch.cuda.is_available():
            return
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self._prof = profile(activities=[ProfilerActivity.CUDA])
        self._prof.__enter__()
        self._started = time.perf_counter()

    def end(self, step: int) -> None:
        if self._prof is None or step != self.index:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        self.summary, self._prof = kernel_summary(self._prof, wall), None
