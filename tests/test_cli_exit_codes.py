"""Exit codes of the real `align` program: 143/130 after SIGTERM/SIGINT mid-run (checkpoint saved, resume command
printed), also through the `--accelerate-config` relaunch; 2 and one line for every usage error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align_cli.checkpoint import list_checkpoints
from align_cli.distributed import relaunch_exit_code

# The console script pip installed (`align = "align_cli.cli:main"`): the code path users run.
CONSOLE_SCRIPT = Path(sys.executable).with_name("align")
ALIGN = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from align_cli.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}

# One CPU process for `accelerate launch`: its single-process launcher, which dies at once on SIGTERM.
CPU_LAUNCH_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_processes: 1
num_machines: 1
machine_rank: 0
use_cpu: true
mixed_precision: 'no'
"""


def run_align(*arguments, timeout=180):
    return subprocess.run([*ALIGN, *arguments], env=ENV, capture_output=True, text=True, timeout=timeout)


def trained_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["split"] == "train")


def interrupt_mid_run(arguments, run_dir: Path, number: int, logs: Path, timeout=240):
    """Start `align ARGUMENTS`, send signal NUMBER once it has logged two optimiser steps, wait for it to end;
    return (exit code, stderr)."""
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        process = subprocess.Popen([*ALIGN, *arguments], env=ENV, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while trained_steps(run_dir) < 2:
                assert process.poll() is None, (logs / "err.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no training step logged in time"
                time.sleep(0.2)
            process.send_signal(number)
            code = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, (logs / "err.txt").read_text()


def long_recipe(tiny_recipe):
    # Far more steps than the test waits for: the signal always lands mid-run, inside the training loop.
    return tiny_recipe(training__max_steps=100000, checkpointing__every=100000, evaluation__task=None,
                       logging__tensorboard=False)


@pytest.mark.parametrize("number, expected", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_saves_a_checkpoint_and_exits_128_plus_the_signal(number, expected, tiny_recipe, tmp_path):
    recipe = long_recipe(tiny_recipe)
    run_dir = tmp_path / "run"
    code, err = interrupt_mid_run(["train", str(recipe), "--set", "logging.progress=false"], run_dir, number, tmp_path)
    assert code == expected, err[-3000:]
    assert list_checkpoints(run_dir), err[-3000:]
    # The resume command repeats the overrides: the resumed run must read the same recipe.
    assert f"Continue with: align train {recipe} --set logging.progress=false --resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("number, expected", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_through_the_accelerate_relaunch_exits_128_plus_it_after_the_worker_saved(number, expected,
                                                                                          tiny_recipe, tmp_path):
    recipe = long_recipe(tiny_recipe)
    launch_config = tmp_path / "cpu.yaml"
    launch_config.write_text(CPU_LAUNCH_CONFIG)
    run_dir = tmp_path / "run"
    code, err = interrupt_mid_run(["train", str(recipe), "--accelerate-config", str(launch_config)], run_dir,
                                  number, tmp_path)
    assert code == expected, err[-3000:]
    # The relaunching process waited for the worker (orphaned when its launcher died) to save and exit.
    assert list_checkpoints(run_dir), err[-3000:]
    assert f"Continue with: align train {recipe} --resume --accelerate-config {launch_config}" in err, err[-3000:]
    assert "Traceback" not in err


def test_a_failed_worker_surfaces_its_exit_code_through_the_relaunch(tiny_recipe, tmp_path):
    # The recipe is valid (checked before relaunching); its data file is not, which only the worker finds out.
    recipe = tiny_recipe(data__train__source=str(tmp_path / "absent.jsonl"), evaluation__task=None)
    launch_config = tmp_path / "cpu.yaml"
    launch_config.write_text(CPU_LAUNCH_CONFIG)
    done = run_align("train", str(recipe), "--accelerate-config", str(launch_config))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "absent.jsonl" in done.stderr and "Traceback" not in done.stderr


def test_relaunch_exit_code_prefers_the_workers_own_code():
    assert relaunch_exit_code(1, {0: 2, 1: 1}, None) == 2  # rank 0's user error, not the launcher's 1
    assert relaunch_exit_code(1, {0: 0, 1: 143}, signal.SIGTERM) == 143
    assert relaunch_exit_code(1, {0: 143}, signal.SIGINT) == 130  # Ctrl-C, forwarded to the workers as SIGTERM
    assert relaunch_exit_code(1, {0: 143, 1: 1}, signal.SIGINT) == 1  # a worker that crashed while stopping
    assert relaunch_exit_code(-15, {}, signal.SIGTERM) == 143  # workers killed before reporting
    assert relaunch_exit_code(-9, {}, None) == 137
    assert relaunch_exit_code(0, {0: 0}, None) == 0


@pytest.mark.parametrize("arguments, message", [
    (["validate", "a.yaml", "b.yaml"], "Got unexpected extra argument(s) (b.yaml)"),
    (["train", "--bogus", "x"], "No such option: --bogus"),
    (["eval", "--model", "builtin:smollm2-135m-instruct", "--instructions", "builtin:arithmetic_prompts", "--limit", "0"],
     "Invalid value for '--limit'"),
    (["train"], "Missing argument 'recipe'"),
])
def test_usage_errors_exit_2_with_one_line(arguments, message):
    done = run_align(*arguments)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "usage: align" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
