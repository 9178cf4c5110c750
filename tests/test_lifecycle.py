"""The loops' shared lifecycle: the LR schedule's warm-up in optimiser steps, and before.json read or measured."""

import json
from types import SimpleNamespace

import torch

from align_cli.config import TrainingConfig
from align_cli.lifecycle import measured_before, optimiser_and_schedule


def learning_rates(training: TrainingConfig, steps: int, updates_per_step: int) -> list[float]:
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler = optimiser_and_schedule(model, training, steps, updates_per_step)
    rates = []
    for _ in range(steps * updates_per_step):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_steps_count_training_steps_of_several_updates():
    # 2 warm-up training steps of 3 updates each: a linear rise over 6 optimiser steps, then linear decay to 0
    # at 4 x 3 = 12 (transformers' linear schedule, written out).
    training = TrainingConfig(learning_rate=1.0, lr_scheduler="linear", warmup_steps=2)
    expected = [k / 6 if k < 6 else (12 - k) / (12 - 6) for k in range(12)]
    assert learning_rates(training, steps=4, updates_per_step=3) == expected


def test_warmup_ratio_is_a_share_of_all_optimiser_steps():
    training = TrainingConfig(learning_rate=1.0, lr_scheduler="constant_with_warmup", warmup_ratio=0.25)
    assert learning_rates(training, steps=4, updates_per_step=2) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_before_json_is_measured_once_then_read(tmp_path):
    from accelerate import Accelerator

    run = SimpleNamespace(run_dir=tmp_path, accelerator=Accelerator(cpu=True))
    calls = []

    def measure():
        calls.append(1)
        return {"task_accuracy": 0.25}

    assert measured_before(run, measure, "prompts") == {"task_accuracy": 0.25}
    assert json.loads((tmp_path / "before.json").read_text()) == {"task_accuracy": 0.25}
    # A resumed run reads the starting model's numbers back instead of measuring the (now trained) model.
    assert measured_before(run, measure, "prompts") == {"task_accuracy": 0.25}
    assert calls == [1]
