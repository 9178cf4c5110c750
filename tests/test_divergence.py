"""Divergence never reaches a checkpoint, collapse is warned about: both training loops (issue 14)."""

import json
import math
import re

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import align, write_jsonl
from safetensors.torch import load_file

from align_cli import tasks
from align_cli.checkpoint import list_checkpoints
from align_cli.divergence import CollapseMonitor, CollapseWarning, TrainingDiverged, parameters_finite
from align_cli.errors import UserError
from align_cli.pairwise import trainer as pairwise_trainer
from align_cli.recipe import load_recipe
from align_cli.rl import trainer as rl_trainer
from align_cli.rl import update as rl_update


def checkpoint_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of one checkpoint, keyed `file:name`."""
    files = sorted(checkpoint.glob("*.safetensors"))
    assert files, f"{checkpoint} holds no safetensors file"
    return {f"{f.name}:{name}": tensor for f in files for name, tensor in load_file(f).items()}


def assert_every_checkpoint_finite(run_dir):
    for checkpoint in list_checkpoints(run_dir):
        for name, tensor in checkpoint_tensors(checkpoint).items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name} {name} holds non-finite weights"
    root = run_dir / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")], "a half-written checkpoint was left"


class ModelSpy:
    """Wraps a trainer function whose first argument is the policy, to look at the weights after a failure."""

    def __init__(self, function):
        self.function, self.model = function, None

    def __call__(self, model, *args, **kwargs):
        self.model = model
        return self.function(model, *args, **kwargs)


class KeepCheckpoint:
    """`on_step_end`: reads the tensors of the checkpoint saved at `step`, to prove later saves left it intact."""

    def __init__(self, run_dir, step):
        self.run_dir, self.step, self.tensors = run_dir, step, None

    def __call__(self, step):
        if step == self.step:
            self.tensors = checkpoint_tensors(list_checkpoints(self.run_dir)[-1])


def assert_intact(kept: KeepCheckpoint):
    now = checkpoint_tensors(list_checkpoints(kept.run_dir)[-1])
    assert kept.tensors is not None and now.keys() == kept.tensors.keys()
    for name, tensor in kept.tensors.items():
        assert torch.equal(now[name], tensor), name


def assert_weights_equal_checkpoint(model, checkpoint):
    """The live policy's weights are bit-equal to the checkpoint's: the failing step was not applied."""
    saved = load_file(checkpoint / "model.safetensors")
    live = {name: p.detach() for name, p in model.named_parameters() if name in saved}
    assert live, "no parameter of the model is in the checkpoint"
    for name, tensor in live.items():
        assert torch.equal(tensor, saved[name]), name


# ---------------------------------------------------------------- the pieces


def test_parameters_finite_sees_nan_and_inf_in_any_tensor():
    accelerator = Accelerator(cpu=True)
    good = [torch.ones(3), torch.zeros(0), torch.full((2, 2), 3e38)]  # empty: ZeRO-3's placeholders
    assert parameters_finite(accelerator, good)
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.ones(4, 4, dtype=torch.bfloat16)
        tensor[2, 3] = bad
        assert not parameters_finite(accelerator, [*good, tensor])


def test_collapse_monitor_thresholds():
    # loss: start 1.0, limit 1.0 + max(1, 1) = 2.0; warned once, after 3 consecutive steps above it
    monitor = CollapseMonitor()
    assert [bool(monitor.observe(s, loss, 0.5)) for s, loss in
            enumerate([1.0, 2.2, 2.2, 1.9, 2.2, 2.2, 2.2, 2.5, 3.0], 1)] == [False] * 6 + [True, False, False]
    assert monitor.loss_limit() == 2.0 and len(monitor.warnings) == 1 and "above 2" in monitor.warnings[0]
    # a negative start: the margin is max(1, |start|) = 3, limit 0.0
    monitor = CollapseMonitor(patience=2)
    for step, loss in enumerate([-3.0, -0.1, 0.0], 1):
        assert not monitor.observe(step, loss, 1.0)
    assert monitor.observe(4, 0.1, 1.0) == [] and monitor.high_loss_steps == 1
    # gradient: exactly 0 only (1e-30 is a gradient), steps without expected gradient neither count nor reset
    monitor = CollapseMonitor()
    for step, norm, expected in [(1, 0.0, True), (2, 1e-30, True), (3, 0.0, True), (4, 0.0, False), (5, 0.0, True)]:
        assert not monitor.observe(step, 0.7, norm, expects_gradient=expected)
    with pytest.warns(CollapseWarning, match="exactly 0 for 3 consecutive steps"):
        assert monitor.observe(6, 0.7, 0.0)
    # DeepSpeed reports no norm: nothing is counted
    monitor = CollapseMonitor()
    assert not any(monitor.observe(s, 0.7, None) for s in range(1, 6))
    # the state survives a checkpoint (trainer_state.json) and --resume
    assert CollapseMonitor(**json.loads(json.dumps(monitor.as_dict()))) == monitor


# ---------------------------------------------------------------- the pairwise loop


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_pairwise_non_finite_gradient_is_never_applied_nor_saved(tiny_recipe, tmp_path, monkeypatch, max_grad_norm):
    """lr 1e30: step 1 is finite, step 2's loss is finite but its gradient NaN. Before the fix that gradient was
    applied and saved in step-0000002. Without clipping (max_grad_norm None) the norm is still computed."""
    spy = ModelSpy(pairwise_trainer.objective_forward)
    monkeypatch.setattr(pairwise_trainer, "objective_forward", spy)
    run_dir = tmp_path / "run"
    kept = KeepCheckpoint(run_dir, 1)
    path = tiny_recipe(training__learning_rate=1e30, training__max_grad_norm=max_grad_norm, training__max_steps=3,
                       checkpointing__every=1, checkpointing__keep_last=5, evaluation__task=None)
    recipe, recipe_path = load_recipe(str(path))
    with pytest.raises(TrainingDiverged) as error:
        pairwise_trainer.train(recipe, recipe_path, on_step_end=kept)
    assert isinstance(error.value, UserError)  # exit 2 in the CLI
    message = str(error.value)
    assert "at step 2" in message and "the gradient norm became nan (the loss" in message
    assert f"the last finite checkpoint is {run_dir / 'checkpoints' / 'step-0000001'}" in message
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000001"]
    assert_every_checkpoint_finite(run_dir)
    assert_intact(kept)
    assert_weights_equal_checkpoint(spy.model, list_checkpoints(run_dir)[-1])


def test_pairwise_nan_loss_stops_before_backward(tiny_recipe, tmp_path, monkeypatch):
    """A NaN loss at step 3 (injected into the real loss) stops the run; steps 1-2's checkpoints stay."""
    calls = []

    def nan_on_third_call(model, *args, **kwargs):
        loss, metrics, tensors = forward(model, *args, **kwargs)
        if model.training:  # not the measurement of the starting model
            calls.append(model)
        return (loss * float("nan") if len(calls) == 3 and model.training else loss), metrics, tensors

    forward = pairwise_trainer.objective_forward
    monkeypatch.setattr(pairwise_trainer, "objective_forward", nan_on_third_call)
    path = tiny_recipe(training__max_steps=4, checkpointing__every=1, checkpointing__keep_last=5,
                       evaluation__task=None)
    recipe, recipe_path = load_recipe(str(path))
    with pytest.raises(TrainingDiverged, match=r"at step 3: the loss became nan \(micro-batch rows") as error:
        pairwise_trainer.train(recipe, recipe_path)
    assert "step-0000002" in str(error.value)
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000001", "step-0000002"]
    assert_weights_equal_checkpoint(calls[-1], list_checkpoints(run_dir)[-1])


def test_pairwise_nan_before_any_checkpoint_says_none_yet(tiny_recipe, tmp_path, monkeypatch, capsys):
    """A finite loss whose gradient is NaN (sqrt'(0) * 0), injected at step 1: no checkpoint exists yet. Through
    the CLI: exit 2, the message, no traceback."""
    forward = pairwise_trainer.objective_forward

    def nan_gradient(model, batch, *args, **kwargs):
        loss, metrics, tensors = forward(model, batch, *args, **kwargs)
        poison = torch.sqrt(0.0 * tensors["policy_chosen"].sum())  # 0 forward, NaN backward
        return loss + poison, metrics, tensors

    monkeypatch.setattr(pairwise_trainer, "objective_forward", nan_gradient)
    code, _, err = align(monkeypatch, capsys, "train", str(tiny_recipe(training__max_steps=2, evaluation__task=None)))
    assert code == 2 and "Traceback" not in err
    assert re.search(r"at step 1: the gradient norm became nan.*the last finite checkpoint is none yet", err), err
    assert list_checkpoints(tmp_path / "run") == []


def test_pairwise_collapse_is_warned_in_the_log_and_summary(tiny_recipe, tmp_path):
    """lr 1e3 saturates the tiny model: from step 3 the gradient norm is exactly 0; the run still ends (exit 0)."""
    path = tiny_recipe(training__learning_rate=1e3, training__max_steps=5, checkpointing__every=None,
                       evaluation__task=None)
    recipe, recipe_path = load_recipe(str(path))
    with pytest.warns(CollapseWarning, match="exactly 0 for 3 consecutive steps"):
        summary = pairwise_trainer.train(recipe, recipe_path)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["warnings"] == summary["warnings"] and len(summary["warnings"]) == 1
    assert summary["warnings"][0].startswith("Step 5: the gradient norm has been exactly 0")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in records if r["split"] == "train"][2:] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- the RL loop


@pytest.fixture
def rl_run(tmp_path, tiny_model_dir, monkeypatch):
    """`rl_run(learning_rate, max_steps)`: a tiny GRPO run (2 prompts x 4 completions of 6 tokens a step)."""
    write_jsonl(tmp_path / "prompts.jsonl", [tasks.prompt_row(p) for p in tasks.make_problems(16, seed=3)])
    (tmp_path / "tiny_rewards.py").write_text(
        "def vowels(completions, rows):\n    return [sum(c in 'aeiou' for c in t) / (1 + len(t)) for t in completions]\n")
    monkeypatch.chdir(tmp_path)  # the `module:function` reward is imported from the working directory

    def run(learning_rate, max_steps, **kwargs):
        recipe = {
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "data": {"train": {"source": str(tmp_path / "prompts.jsonl")}, "max_length": 96, "max_prompt_length": 80},
            "method": {"name": "grpo", "losses": [{"name": "grpo"}],
                       "rl": {"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 6,
                              "generation_batch_size": 4, "rewards": [{"name": "tiny_rewards:vowels"}]}},
            "training": {"learning_rate": learning_rate, "batch_size": 4, "max_steps": max_steps, "seed": 1,
                         "warmup_ratio": 0.0, "lr_scheduler": "constant"},
            "logging": {"progress": False, "tensorboard": False},
            "checkpointing": {"every": 1, "keep_last": 5},
            "evaluation": {"task": None},
            "output": {"dir": str(tmp_path / "run")},
        }
        (tmp_path / "rl.yaml").write_text(yaml.safe_dump(recipe))
        loaded, path = load_recipe(str(tmp_path / "rl.yaml"))
        return rl_trainer.train_rl(loaded, path, **kwargs)

    return run


def test_rl_non_finite_gradient_is_never_applied_nor_saved(rl_run, tmp_path, monkeypatch):
    spy = ModelSpy(rl_update.micro_batch_loss)
    monkeypatch.setattr(rl_update, "micro_batch_loss", spy)
    kept = KeepCheckpoint(tmp_path / "run", 1)
    with pytest.raises(TrainingDiverged, match=r"at step 2: the gradient norm became nan \(the loss") as error:
        rl_run(1e30, 3, on_step_end=kept)
    run_dir = tmp_path / "run"
    assert f"the last finite checkpoint is {run_dir / 'checkpoints' / 'step-0000001'}" in str(error.value)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000001"]
    assert_every_checkpoint_finite(run_dir)
    assert_intact(kept)
    assert_weights_equal_checkpoint(spy.model, list_checkpoints(run_dir)[-1])


def test_rl_nan_loss_stops_the_step(rl_run, tmp_path, monkeypatch):
    """A NaN micro-batch loss on step 2 (the first of its two micro-batches, injected into the real loss): caught
    before that optimiser step."""
    calls = []

    def nan_on_step_two(model, *args, **kwargs):
        loss, metrics = loss_of(model, *args, **kwargs)
        calls.append(model)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    loss_of = rl_update.micro_batch_loss
    monkeypatch.setattr(rl_update, "micro_batch_loss", nan_on_step_two)
    with pytest.raises(TrainingDiverged, match=r"at step 2: the loss became nan \(optimiser update 1 of 1"):
        rl_run(1e-3, 3)
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000001"]
    assert_weights_equal_checkpoint(calls[-1], list_checkpoints(run_dir)[-1])


def test_rl_collapse_is_warned_in_the_log_and_summary(rl_run, tmp_path):
    """lr 1e3: from step 2 the gradient norm is exactly 0. Step 2's advantages are all zero (equal rewards), where
    a zero gradient is right, so it does not count: warned at step 5 after steps 3-5."""
    with pytest.warns(CollapseWarning, match="exactly 0 for 3 consecutive steps"):
        summary = rl_run(1e3, 5)
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("Step 5:")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["grad_norm"] for r in train][1:] == [0.0] * 4 and math.isclose(train[1]["advantage/abs_mean"], 0.0)
