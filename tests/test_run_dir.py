"""Run directories: --overwrite never loses the old run, one run at a time (lock), --resume refuses a changed
recipe, and the iterative loops follow the same rules."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import align

from align_cli import run_dir as rd
from align_cli.checkpoint import list_checkpoints
from align_cli.config import Recipe
from align_cli.errors import UserError
from align_cli.pairwise.trainer import train
from align_cli.recipe import load_recipe


def run(recipe_path, *overrides, **kwargs):
    recipe, path = load_recipe(str(recipe_path), list(overrides))
    return train(recipe, path, **kwargs)


def snapshot(run_dir: Path) -> dict:
    """Every file of a run (but its lock) with its bytes."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != rd.LOCK_FILE}


def write_lock(run_dir: Path, pid: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / rd.LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier", "command": "align"}))
    return lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


QUICK = {"evaluation__task": None, "logging__tensorboard": False, "training__max_steps": 2}


def test_overwrite_with_a_bad_data_file_leaves_the_old_run_untouched(tiny_recipe, tmp_path):
    run(tiny_recipe(**QUICK))
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"\nnot json\n')
    with pytest.raises(UserError, match="not valid JSON"):
        run(tiny_recipe(data__train={"source": str(bad)}, **QUICK), overwrite=True)
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no lock, nothing aside


def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(tiny_recipe, tmp_path):
    run(tiny_recipe(**QUICK))
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)

    def fail_at_first_step(step):
        raise RuntimeError("the new run dies before its first checkpoint")

    new = tiny_recipe(**{**QUICK, "training__max_steps": 4, "checkpointing__every": 2, "logging__every": 1})
    with pytest.raises(RuntimeError, match="dies before"):
        run(new, overwrite=True, on_step_end=fail_at_first_step)
    assert snapshot(run_dir) == before, "the old run is back, byte for byte"
    assert not (run_dir / rd.LOCK_FILE).exists() and not (run_dir / rd.REPLACED_DIR).exists()

    old_run_aside = {}
    run(new, overwrite=True, on_step_end=lambda step: old_run_aside.setdefault(step, (run_dir / rd.REPLACED_DIR).exists()))
    assert old_run_aside == {1: True, 2: False, 3: False, 4: False}, "deleted once step 2 was checkpointed"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002", "step-0000004"]


def test_a_kill_during_an_overwrite_is_repaired_at_the_next_start(tmp_path):
    old_run = tmp_path / "run"
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "summary.json").write_text('{"steps": 4}')
    (old_run / "metrics.jsonl").write_text('{"step": 1}\n')
    recipe = Recipe(output={"dir": str(old_run)})

    rd._displace(old_run)  # the new run moved the old one aside ...
    (old_run / "metrics.jsonl").write_text('{"step": 1, "new": true}\n')  # ... wrote a little, and was killed
    with rd.run_scope(), pytest.warns(UserWarning, match="is back in place"):
        with pytest.raises(UserError, match="already holds a run"):
            rd.resolve_run_dir(recipe, None, None, resume=False, overwrite=False)
    assert (old_run / "summary.json").read_text() == '{"steps": 4}'
    assert (old_run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in old_run.iterdir()) == ["checkpoints", "metrics.jsonl", "summary.json"]

    partial = old_run / rd.REPLACING_DIR  # killed half-way through moving the old run aside
    partial.mkdir()
    os.rename(old_run / "summary.json", partial / "summary.json")
    with rd.run_scope(), pytest.warns(UserWarning, match="old run is back"), pytest.raises(UserError):
        rd.resolve_run_dir(recipe, None, None, resume=False, overwrite=False)
    assert sorted(p.name for p in old_run.iterdir()) == ["checkpoints", "metrics.jsonl", "summary.json"]


def test_a_second_run_into_a_running_directory_is_refused_with_exit_2(tiny_recipe, tmp_path):
    path = tiny_recipe(**QUICK)
    run_dir = tmp_path / "run"
    seen = {}

    def second_run_meanwhile(step):
        if step == 1:
            environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            seen["result"] = subprocess.run([sys.executable, "-m", "align_cli.cli", "train", str(path), "--overwrite"],
                                            capture_output=True, text=True, env=environment, timeout=300)
            seen["lock"] = json.loads((run_dir / rd.LOCK_FILE).read_text())

    run(path, on_step_end=second_run_meanwhile)
    result = seen["result"]
    assert result.returncode == 2, result.stderr
    assert f"pid {os.getpid()}" in result.stderr and "in use by another run" in result.stderr
    assert "Traceback" not in result.stderr
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert not (run_dir / rd.LOCK_FILE).exists(), "released when the run ends"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tiny_recipe, tmp_path, monkeypatch, capsys):
    path = tiny_recipe(**{**QUICK, "training__max_steps": 1})
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(run_dir, holder.pid)
        code, _, err = align(monkeypatch, capsys, "train", str(path))
        assert code == 2 and f"pid {holder.pid}" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    pid = dead_pid()
    write_lock(run_dir, pid)
    with pytest.warns(UserWarning, match=rf"Taking over the stale lock .* pid {pid}"):
        run(path)
    assert not (run_dir / rd.LOCK_FILE).exists()


def test_the_lock_is_released_when_opening_fails(tmp_path):
    recipe = Recipe(output={"dir": str(tmp_path / "run")})
    with rd.run_scope(), pytest.raises(UserError, match="no checkpoint"):
        rd.resolve_run_dir(recipe, None, None, resume=True, overwrite=False)
    assert not (tmp_path / "run").exists(), "the directory it made for its lock is gone again"


def test_resume_refuses_a_changed_recipe_unless_allowed(tiny_recipe, tmp_path, monkeypatch, capsys, pairs_file):
    path = tiny_recipe(**{**QUICK, "training__max_steps": 1})
    run(path)
    run_dir = tmp_path / "run"
    stored = (run_dir / "recipe.yaml").read_bytes()
    with pytest.raises(UserError, match=r"training\.learning_rate: 0\.001 -> 0\.002.*--allow-recipe-change") as error:
        run(path, "training.learning_rate=2e-3", "logging.every=3", resume=True)
    assert "logging.every" not in str(error.value).split("On resume only")[0], "only the keys that matter are listed"
    assert (run_dir / "recipe.yaml").read_bytes() == stored

    # Keys that cannot change the trajectory: accepted, with a warning, and recorded in recipe.yaml.
    with pytest.warns(UserWarning, match=r"logging\.every: 1 -> 3; training\.max_steps: 1 -> 2"):
        assert run(path, "training.max_steps=2", "logging.every=3", resume=True)["steps"] == 2
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["logging"]["every"] == 3

    code, _, err = align(monkeypatch, capsys, "train", str(path), "--resume", "--set", "training.learning_rate=2e-3",
                         "--set", "training.max_steps=2")
    assert code == 2 and "training.learning_rate: 0.001 -> 0.002" in err
    code, _, err = align(monkeypatch, capsys, "train", str(path), "--resume", "--allow-recipe-change",
                         "--set", "training.learning_rate=2e-3", "--set", "training.max_steps=3")
    assert code == 0, err
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]["learning_rate"] == 2e-3

    # A resume that fails after the recipe check (its data is gone) leaves recipe.yaml as it was.
    stored = (run_dir / "recipe.yaml").read_bytes()
    shutil.move(pairs_file, tmp_path / "moved.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        run(path, "training.learning_rate=2e-3", "training.max_steps=3", "logging.every=5", resume=True)
    assert (run_dir / "recipe.yaml").read_bytes() == stored


def test_which_keys_may_change_on_resume():
    constant = Recipe(training={"lr_scheduler": "constant", "warmup_ratio": 0.0}).model_dump(mode="json")
    cosine = Recipe(training={"lr_scheduler": "cosine"}).model_dump(mode="json")
    assert rd.is_resume_safe("training.max_steps", constant, constant)
    assert not rd.is_resume_safe("training.max_steps", cosine, cosine), "a cosine schedule stretches with max_steps"
    assert rd.is_resume_safe("logging.every", cosine, cosine) and rd.is_resume_safe("output.dir", cosine, cosine)
    assert not rd.is_resume_safe("training.seed", constant, constant)
    assert not rd.is_resume_safe("checkpointing.every_other", constant, constant)  # exact keys, not prefixes
    old = {"method": {"losses": [{"name": "dpo", "beta": 0.1}]}}
    new = {"method": {"losses": [{"name": "dpo", "beta": 0.2}, {"name": "sft"}]}}
    assert rd.recipe_changes(old, new) == {"method.losses.0.beta": (0.1, 0.2),
                                           "method.losses.1.name": ("(absent)", "sft")}


def test_iterative_run_dirs_follow_the_same_rules(tmp_path):
    from align_cli.iterative import loop

    run_dir = tmp_path / "apo"
    recipe = Recipe(method={"name": "apo"}, output={"dir": str(run_dir)})
    with rd.run_scope():
        loop.open_run_dir(recipe, None, None, resume=False, overwrite=False)
        (run_dir / "iteration-0").mkdir()
        (run_dir / "iteration-0" / "evaluation.json").write_text("{}")
        assert (run_dir / rd.LOCK_FILE).exists()
        with pytest.raises(UserError, match="in use by another run"):  # a second run meanwhile
            with rd.run_scope():
                loop.open_run_dir(recipe, None, None, resume=False, overwrite=True)
    assert not (run_dir / rd.LOCK_FILE).exists()
    before = snapshot(run_dir)

    changed = Recipe(method={"name": "apo", "apo": {"alpha": 0.5}}, output={"dir": str(run_dir)})
    with rd.run_scope(), pytest.raises(UserError, match=r"method\.apo\.alpha: 0\.3 -> 0\.5"):
        loop.open_run_dir(changed, None, None, resume=True, overwrite=False)
    with pytest.raises(RuntimeError), rd.run_scope():  # an --overwrite that fails before any checkpoint
        loop.open_run_dir(changed, None, None, resume=False, overwrite=True)
        assert not (run_dir / "iteration-0").exists()
        raise RuntimeError("sampling failed")
    assert snapshot(run_dir) == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rd.run_scope():
            loop.open_run_dir(changed, None, None, resume=True, overwrite=False, allow_recipe_change=True)
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["method"]["apo"]["alpha"] == 0.5
