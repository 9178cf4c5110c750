"""Fixtures and independent computations shared by the tests of the iterative methods (APO, Curry-DPO)."""

import json
import os
import random
import signal

import pytest
import torch


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny random-init Llama sequence-classification model (one output) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompt_rows(count: int, seed: int = 3) -> list[dict]:
    from align_cli import tasks

    return [tasks.prompt_row(problem) for problem in tasks.make_problems(count, seed=seed)]


def pair_rows(count: int, seed: int = 7) -> list[dict]:
    from align_cli import tasks

    rng = random.Random(0)
    return [tasks.pair_row(problem, rng) for problem in tasks.make_problems(count, seed=seed)]


def rated_rows(count: int, seed: int = 11) -> list[dict]:
    from align_cli import tasks

    rng = random.Random(0)
    return [tasks.rated_row(problem, rng) for problem in tasks.make_problems(count, seed=seed)]


@torch.no_grad()
def completion_logp(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """Sum of the completion's token log-probs, by hand: one plain forward in float64, chat template applied."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model.double()(input_ids=ids).logits[0, :-1]
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(log_probs[positions, targets[positions]].sum())


def load_weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def sigint_on_call(number: int):
    """An `on_step_end` hook that sends this process SIGINT at its `number`-th call (1-based), as a user's
    Ctrl-C would, across the trainer runs of an iterative method."""
    calls = []

    def hook(step: int) -> None:
        calls.append(step)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGINT)

    return hook
