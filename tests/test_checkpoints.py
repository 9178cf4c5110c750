"""Checkpoints: manifests verified on resume (fallback past broken ones), deletion that a kill cannot leave
half-done, and LoRA checkpoints that hold only the adapter yet resume bitwise."""

import json
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file

from align_cli import checkpoint as ckpt
from align_cli.checkpoint import (
    MANIFEST_FILE,
    checkpoint_problem,
    clean_leftovers,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from align_cli.errors import UserError
from align_cli.lifecycle import Interrupted
from align_cli.pairwise.trainer import train
from align_cli.recipe import load_recipe


def run(recipe_path, *overrides, **kwargs):
    recipe, path = load_recipe(str(recipe_path), list(overrides))
    return train(recipe, path, **kwargs)


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final_model", "model.safetensors"))


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.fixture
def tiny_accelerator():
    """An Accelerator with a 2x2 linear model and its optimiser prepared: save_checkpoint without a trainer."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return accelerator


def test_resume_falls_back_past_a_truncated_or_emptied_checkpoint_and_matches_uninterrupted(tiny_recipe, tmp_path):
    path = tiny_recipe(evaluation__task=None, logging__tensorboard=False)
    run(path)
    run_dir = tmp_path / "run"
    expected = final_weights(run_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002", "step-0000004"]
    damages = {
        "model.safetensors": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        "optimizer.bin": lambda f: f.write_bytes(f.read_bytes()[:100]),
        "trainer_state.json": lambda f: f.write_text(""),
    }
    for name, damage in damages.items():
        damage(run_dir / "checkpoints" / "step-0000004" / name)
        with pytest.warns(UserWarning, match=rf"Skipping checkpoint .*step-0000004: {name}"):
            summary = run(path, resume=True)
        assert summary["steps"] == 4
        assert_bitwise_equal(final_weights(run_dir), expected)
        assert checkpoint_problem(run_dir / "checkpoints" / "step-0000004") is None, "step 4 is written again"


def test_resume_without_any_verified_checkpoint_is_a_user_error(tiny_recipe, tmp_path):
    path = tiny_recipe(evaluation__task=None, training__max_steps=1, checkpointing__every=1, checkpointing__keep_last=1)
    run(path)
    state = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer_state.json"
    state.write_text("")
    with pytest.raises(UserError, match=r"no complete checkpoint.*step-0000001: trainer_state.json has 0 bytes"):
        run(path, resume=True)


def test_manifest_is_written_last_and_a_checkpoint_without_one_is_not_complete(tiny_accelerator, tmp_path):
    final = save_checkpoint(tiny_accelerator, tmp_path, 1, {"micro_batch": 1}, keep_last=2)
    manifest = json.loads((final / MANIFEST_FILE).read_text())["files"]
    for name, entry in manifest.items():
        assert (final / name).stat().st_size == entry["bytes"] and ckpt.sha256_of(final / name) == entry["sha256"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest)
    (final / MANIFEST_FILE).unlink()  # e.g. a copy of the run that stopped before the manifest
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_a_kill_during_old_checkpoint_deletion_never_leaves_a_half_deleted_step(tiny_accelerator, tmp_path,
                                                                                 monkeypatch):
    save_checkpoint(tiny_accelerator, tmp_path, 1, {}, keep_last=1)
    real_rmtree = ckpt.shutil.rmtree

    def killed_part_way(path, ignore_errors=False):
        os.remove(os.path.join(path, "model.safetensors"))  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_part_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_accelerator, tmp_path, 2, {}, keep_last=1)  # deleting step 1 is cut short
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".deleting-step-0000001") for p in root.iterdir())
    clean_leftovers(tmp_path)  # what the next start does, holding the lock
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]


def test_lora_checkpoints_hold_only_the_adapter_and_resume_bitwise(tiny_recipe, tmp_path):
    lora = {"peft__enabled": True, "peft__r": 4, "evaluation__task": None, "logging__tensorboard": False,
            "output__save_final_model": True, "peft__merge_on_save": True}
    run(tiny_recipe(output__dir=str(tmp_path / "straight"), **lora))
    expected = final_weights(tmp_path / "straight")

    interrupted = tiny_recipe(output__dir=str(tmp_path / "interrupted"), checkpointing__every=100, **lora)

    def stop_after_two(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run(interrupted, on_step_end=stop_after_two)
    assert not (tmp_path / "interrupted" / "run.lock").exists(), "the lock is released on SIGINT too"
    checkpoint = tmp_path / "interrupted" / "checkpoints" / "step-0000002"
    stored = load_file(checkpoint / "model.safetensors")
    assert stored and all("lora_" in name for name in stored), "only adapter tensors are stored"
    full_size = (tmp_path / "straight" / "final_model" / "model.safetensors").stat().st_size
    assert (checkpoint / "model.safetensors").stat().st_size < full_size / 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(interrupted, resume=True)
    assert not [w for w in caught if "Skipping checkpoint" in str(w.message)], "the adapter checkpoint verifies"
    assert_bitwise_equal(final_weights(tmp_path / "interrupted"), expected)
