"""The pairwise trainer end to end on a tiny model: outputs, resume equivalence, signals, NaN, caches."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from align_cli.checkpoint import list_checkpoints
from align_cli.errors import UserError
from align_cli.lifecycle import Interrupted
from align_cli.pairwise.trainer import train
from align_cli.recipe import load_recipe


def run(recipe_path, *overrides, **kwargs):
    recipe, path = load_recipe(str(recipe_path), list(overrides))
    return train(recipe, path, **kwargs)


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final_model", "model.safetensors"))


def test_run_writes_every_output(tiny_recipe, tmp_path):
    summary = run(tiny_recipe())
    run_dir = tmp_path / "run"
    assert (run_dir / "summary.json").exists() and json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(0.0 <= r["rewards/accuracies"] <= 1.0 and r["tokens_per_second"] > 0 for r in train_records)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002", "step-0000004"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final_model") is not None
    for when in ("before", "after"):
        assert {"loss", "rewards/accuracies", "likelihood_accuracy", "task_accuracy"} <= set(summary[when])
    # The tiny model learns its 24 training pairs at lr 1e-3: the final loss is below log(2).
    assert summary["final_train_metrics"]["loss"] < 0.69


def test_resume_matches_uninterrupted(tiny_recipe, tmp_path):
    straight = tiny_recipe(output__dir=str(tmp_path / "straight"))
    run(straight)
    expected = final_weights(tmp_path / "straight")

    interrupted = tiny_recipe(output__dir=str(tmp_path / "interrupted"), checkpointing__every=100)

    def kill_after_two(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stop:
        run(interrupted, on_step_end=kill_after_two)
    assert stop.value.step == 2 and stop.value.checkpoint.name == "step-0000002"
    run(interrupted, resume=True)
    resumed = final_weights(tmp_path / "interrupted")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if record["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_existing_run_is_never_overwritten_silently(tiny_recipe):
    path = tiny_recipe(training__max_steps=1, evaluation__task=None)
    run(path)
    with pytest.raises(UserError, match="already holds a run"):
        run(path)
    run(path, overwrite=True)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tiny_recipe, tmp_path):
    path = tiny_recipe(training__learning_rate=1e30, training__max_grad_norm=None, checkpointing__every=1,
                       evaluation__task=None)
    with pytest.raises(UserError, match=r"at step \d+") as error:
        run(path)
    assert "checkpoint" in str(error.value)
    kept = list_checkpoints(tmp_path / "run")
    assert kept, "the last good checkpoint must survive"


def test_reference_cache_is_reused(tiny_recipe, tmp_path):
    cache = tmp_path / "refcache"
    first = run(tiny_recipe(reference__precompute=True, reference__cache_dir=str(cache), evaluation__task=None,
                            output__dir=str(tmp_path / "a")))
    assert first["reference"] == "cached" and first["reference_rows_computed"]["train"] > 0
    second = run(tiny_recipe(reference__precompute=True, reference__cache_dir=str(cache), evaluation__task=None,
                             output__dir=str(tmp_path / "b")))
    assert second["reference_rows_computed"] == {"train": 0, "eval": 0}
    live = run(tiny_recipe(evaluation__task=None, output__dir=str(tmp_path / "c")))
    assert live["final_train_metrics"]["loss"] == pytest.approx(second["final_train_metrics"]["loss"], rel=1e-4)
    changed = run(tiny_recipe(reference__precompute=True, reference__cache_dir=str(cache), evaluation__task=None,
                              data__max_length=90, output__dir=str(tmp_path / "d")))
    assert changed["reference_rows_computed"]["train"] > 0, "a tokenisation change must give a new cache key"


def test_lora_uses_adapter_disabled_policy_as_reference(tiny_recipe):
    summary = run(tiny_recipe(peft__enabled=True, peft__r=4, evaluation__task=None))
    # At step 0 LoRA's B matrices are zero: policy == reference, so every margin was exactly zero.
    assert summary["before"]["rewards/margins"] == 0.0
    assert summary["after"]["rewards/margins"] != 0.0


def test_reference_free_loss_loads_no_reference(tiny_recipe, monkeypatch):
    import align_cli.run_setup as setup

    loaded = []
    original = setup.load_causal_lm
    monkeypatch.setattr(setup, "load_causal_lm", lambda *a, **k: loaded.append(a[0]) or original(*a, **k))
    run(tiny_recipe(method__losses=[{"name": "sft"}], evaluation__task=None))
    assert len(loaded) == 1, "only the policy is loaded when no loss needs a reference"


def test_gradient_accumulation_equals_one_big_batch(tiny_recipe, tmp_path, monkeypatch):
    # Plain SGD makes the update linear in the gradient, so equal weights mean equal gradients
    # (AdamW's first step is nearly sign(g) and would hide a wrong normalisation).
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    run(tiny_recipe(training__batch_size=4, training__gradient_accumulation_steps=1, training__max_steps=1,
                    evaluation__task=None, output__dir=str(tmp_path / "big")))
    run(tiny_recipe(training__batch_size=2, training__gradient_accumulation_steps=2, training__max_steps=1,
                    evaluation__task=None, output__dir=str(tmp_path / "accumulated")))
    big, accumulated = final_weights(tmp_path / "big"), final_weights(tmp_path / "accumulated")
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_decision():
    from align_cli.compilation import compile_decision

    assert compile_decision("auto", device_type="cuda", engine="single")[0]
    assert compile_decision("auto", device_type="cuda", engine="fsdp2")[0]
    assert not compile_decision("auto", device_type="cpu", engine="single")[0]
    assert not compile_decision("auto", device_type="cuda", engine="zero3")[0]
    assert compile_decision(True, device_type="cpu", engine="zero2") == (True, "training.compile: true")
    assert not compile_decision(False, device_type="cuda", engine="single")[0]


def _train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_compiled_lora_run_matches_eager_and_a_failing_compiler_falls_back(tiny_recipe, tmp_path, monkeypatch):
    """`training.compile: true` with LoRA: the layers compile (aot_eager here: dynamo's trace and AOTAutograd,
    without inductor's C++ build on a CPU) and train as the eager run does; a backend that fails makes every
    layer fall back to eager, with a warning and summary.json saying so, and the run still matches."""
    import torch._dynamo
    from torch._dynamo.backends.registry import register_backend

    @register_backend(name="align_test_failing")
    def failing(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    common = dict(peft__enabled=True, peft__r=4, evaluation__task=None, output__save_final_model=False,
                  training__max_steps=2, checkpointing__every=None)
    eager = run(tiny_recipe(output__dir=str(tmp_path / "eager"), **common))
    assert eager["compile"] == {"enabled": False, "why": "auto: compiled on CUDA only (on CPU inductor's build costs "
                                                         "more than it saves)"}
    monkeypatch.setenv("ALIGN_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    compiled = run(tiny_recipe(output__dir=str(tmp_path / "compiled"), training__compile=True, **common))
    assert compiled["compile"]["enabled"] and compiled["compile"]["policy"] == {"backend": "aot_eager",
                                                                                "fell_back": None}
    assert _train_losses(tmp_path / "compiled") == pytest.approx(_train_losses(tmp_path / "eager"), abs=1e-5)
    monkeypatch.setenv("ALIGN_COMPILE_BACKEND", "align_test_failing")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="torch.compile of the decoder layers failed"):
        fallen = run(tiny_recipe(output__dir=str(tmp_path / "fallen"), training__compile=True, **common))
    assert "no compiler on this machine" in fallen["compile"]["policy"]["fell_back"]
    assert _train_losses(tmp_path / "fallen") == pytest.approx(_train_losses(tmp_path / "eager"), abs=1e-6)
    torch._dynamo.reset()
