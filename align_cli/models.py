"""Loading the policy, its tokenizer and the frozen reference."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .builtin_models import builtin_model_dir, is_builtin
from .config import LoraConfig, ModelConfig
from .errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_location(name: str) -> str:
    """A path or hub id transformers can load; builtin models are converted and cached first."""
    if is_builtin(name):
        return str(builtin_model_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"Model directory '{name}' has no config.json: point model.name at a Hugging Face model "
                            f"directory (for a run directory, use its final_model/ folder).")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(f"Model directory '{name}' does not exist. Check model.name (or reference.name).")
    return name  # a hub id


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def inference_device() -> torch.device:
    """Where a single-process command (generate, eval, judges) runs its model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_error(name: str, error: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    reason = "hub access is off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else str(error)
    return UserError(f"Model '{name}' could not be loaded: {reason}. Use a local model directory or "
                     f"builtin:smollm2-135m-instruct.")


def load_tokenizer(config: ModelConfig, chat_template: str | None = None):
    from transformers import AutoTokenizer

    location = resolve_model_location(config.tokenizer or config.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except OSError as error:
        raise _hub_error(config.tokenizer or config.name, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        template_path = Path(chat_template)
        tokenizer.chat_template = template_path.read_text() if template_path.is_file() else chat_template
    return tokenizer


def load_causal_lm(name: str, config: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    location = resolve_model_location(name)
    kwargs = {"dtype": dtype, "revision": config.revision, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        raise _hub_error(name, error) from None


def apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def freeze(model):
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_for_inference(name: str, config: ModelConfig, dtype: torch.dtype):
    """A frozen model on `inference_device()`: what sampling, generation and held-out evaluation run."""
    return freeze(load_causal_lm(name, config, dtype)).to(inference_device())


def reference_context(policy, separate_reference):
    """How to run the reference: its own frozen model, or the policy with LoRA adapters disabled."""
    if separate_reference is not None:
        return separate_reference, contextlib.nullcontext()
    if hasattr(policy, "disable_adapter"):
        return policy, policy.disable_adapter()
    raise ValueError("a reference model is needed: pass one or use LoRA")


def output_head(model):
    """The LM-head module (through PEFT and Accelerate wrappers)."""
    return unwrap(model).get_output_embeddings()


def decoder(model):
    """The transformer body that returns hidden states (LoRA layers stay active inside it)."""
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
