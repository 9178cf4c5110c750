"""Shared fixtures: offline hub settings, a tiny random-init model with SmolLM2's tokenizer, small data."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_dir():
    """The embedded model converted to a plain HF directory (converted once per cache)."""
    from align_cli.builtin_models import builtin_model_dir

    return builtin_model_dir("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir, tokenizer):
    """A 2-layer random-init Llama with SmolLM2's tokenizer and chat template, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def align(monkeypatch, capsys, *arguments):
    """Run `align ARGUMENTS` in this process; return (exit code, stdout, stderr)."""
    from align_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["align", *arguments])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path):
    """32 conversational arithmetic pairs from the shipped task."""
    import random

    from align_cli import tasks

    rng = random.Random(0)
    rows = [tasks.pair_row(p, rng) for p in tasks.make_problems(32, seed=7)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, pairs_file):
    """Write a recipe for the tiny model; keyword overrides are dotted keys."""
    import yaml

    from align_cli.recipe import set_dotted_key

    def make(**overrides):
        recipe = {
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "data": {"train": {"source": str(pairs_file)}, "eval_fraction": 0.25, "max_length": 96,
                     "max_prompt_length": 80},
            "method": {"name": "dpo", "losses": [{"name": "dpo", "beta": 0.1}]},
            "training": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 4, "seed": 1, "warmup_ratio": 0.0,
                         "lr_scheduler": "constant"},
            "logging": {"progress": False, "tensorboard": True},
            "checkpointing": {"every": 2, "keep_last": 2},
            "evaluation": {"task": "arithmetic", "num_prompts": 4, "max_new_tokens": 4, "batch_size": 4},
            "output": {"dir": str(tmp_path / "run")},
        }
        for dotted, value in overrides.items():
            set_dotted_key(recipe, dotted.split("__"), value, f"tiny_recipe({dotted}=...)")
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make
