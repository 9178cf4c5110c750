"""The run directory: one run at a time, what --resume and --overwrite may do, and never losing the old run.

Every runner (the pairwise trainer, the RL trainer, the iterative loops) opens its directory with
`resolve_run_dir` inside `run_scope` (the `holds_run_directory` decorator), and calls `begin_writing` once it
has validated its recipe and loaded its inputs. The rules:

- Lock: the main process holds `run.lock` (pid, host, command; JSON) in the run directory for the run's
  duration. A second run into the directory is refused with a `UserError` naming the holder; a lock left by
  a dead process on this host is taken over with a warning. The lock is released when the runner returns or
  raises, SIGINT and SIGTERM included (the training loops turn them into exceptions after a checkpoint;
  elsewhere SIGTERM exits through `SystemExit`, SIGINT through `KeyboardInterrupt`).
- --overwrite: nothing of the old run is touched until `begin_writing`; then it is moved aside into
  `.replaced-run/` (renames, no copy), deleted once the new run has written its first checkpoint or finished,
  and moved back when the new run fails before that. A kill at any point is repaired at the next start.
- --resume: the recipe may differ from the run's recipe.yaml only in keys that cannot change the training
  trajectory (`RESUME_SAFE_KEYS`), unless `allow_recipe_change`; recipe.yaml is rewritten only by
  `begin_writing`, so a resume that fails before that leaves it as it was. The newest checkpoint that verifies
  against its manifest is used; newer broken ones are removed with a warning naming each.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import DELETING_PREFIX, broken_checkpoints, clean_leftovers, list_checkpoints, remove_tree
from .errors import UserError
from .methods import METHODS

LOCK_FILE = "run.lock"
RECIPE_FILE = "recipe.yaml"
REPLACED_DIR = ".replaced-run"  # the old run an --overwrite moved aside, complete
REPLACING_DIR = ".replacing-run"  # the same while its entries are being moved in
RESTORING_MARK = ".restoring"  # inside REPLACED_DIR: the new run's files are gone, the old ones are moving back

# Keys that may change on --resume: they steer logging, output, evaluation, compilation and Liger's fused kernels
# (the same values up to float rounding), where activations wait (training.offload_activations and
# reference.offload: the same values) and how the MLP's tokens are cut (training.mlp_chunk_tokens: the same values
# up to float rounding), never the optimisation.
RESUME_SAFE_KEYS = ("logging.*", "output.*", "checkpointing.every", "checkpointing.keep_last",
                    "evaluation.batch_size", "data.num_proc", "training.compile", "training.offload_activations",
                    "training.mlp_chunk_tokens", "reference.offload", "training.liger_kernels")
MAX_STEPS_RULE = ("training.max_steps when the learning-rate schedule does not depend on the total (lr_scheduler "
                  "constant or constant_with_warmup with warmup_steps, not warmup_ratio; and no D^3S schedule)")


def _processes():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # as the trainers' Accelerator has it


@dataclass
class OpenRun:
    path: Path
    lock: Path | None  # main process only
    created: bool  # the directory did not exist: removed again when the run leaves it empty
    replace_previous: bool  # --overwrite of an existing run: moved aside by `begin_writing`
    recipe_text: str
    displaced: bool = False


_frames: list[list[OpenRun]] = []  # one per active `run_scope`, innermost last
_unscoped: list[OpenRun] = []  # opened outside any `run_scope`: closed when the process exits


def _open_runs() -> list[OpenRun]:
    return [run for frame in _frames for run in frame] + _unscoped


@contextlib.contextmanager
def run_scope():
    """Everything `resolve_run_dir` opens inside is closed on leaving: on success the replaced old run is
    deleted; on any exception it is put back unless the new run already wrote a checkpoint; the lock goes."""
    frame: list[OpenRun] = []
    _frames.append(frame)
    sigterm = _exit_on_sigterm()
    succeeded = False
    try:
        yield frame
        succeeded = True
    finally:
        _frames.remove(frame)
        _restore_sigterm(sigterm)
        for run in reversed(frame):
            _close(run, succeeded)


def holds_run_directory(function):
    """Run `function` (a runner: `pairwise.trainer.train`, `train_rl`, the iterative loops) inside a `run_scope`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with run_scope():
            return function(*args, **kwargs)

    return wrapper


def _exit_on_sigterm():
    """Outside the training loops (whose own handler saves a checkpoint first) SIGTERM would kill the process
    without unwinding; as `SystemExit(143)` it releases the lock and puts an old run back like any exception."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def terminate(number, _frame):
        raise SystemExit(128 + number)

    signal.signal(signal.SIGTERM, terminate)
    return terminate


def _restore_sigterm(installed) -> None:
    if installed is not None and signal.getsignal(signal.SIGTERM) is installed:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------- the lock


def _lock_payload() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(holder: dict | None, path: Path) -> bool:
    """A lock nobody holds: unreadable, or of a process of this host that is gone (or of this very process
    but not held by any run it has open)."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: cannot be checked, so it is held
    if holder["pid"] == os.getpid():
        return not any(run.lock == path for run in _open_runs())
    return not _pid_alive(holder["pid"])


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "an unreadable lock"
    return f"pid {holder['pid']} on host {holder.get('host')} since {holder.get('since')} ({holder.get('command', '')})"


def acquire_lock(run_dir: Path) -> Path:
    """Create `run_dir/run.lock` atomically (a complete file hard-linked into place: never seen half-written)."""
    path = run_dir / LOCK_FILE
    for _ in range(3):
        staging = run_dir / f".{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.write_text(json.dumps(_lock_payload()))
        try:
            os.link(staging, path)
            return path
        except FileExistsError:
            pass
        finally:
            staging.unlink()
        holder = _read_lock(path)
        if not _is_stale(holder, path):
            raise UserError(f"Output directory '{run_dir}' is in use by another run: {_describe(holder)}. Wait for "
                            f"it to finish or stop it, or pass --output-dir to write elsewhere. If no such run "
                            f"exists, delete {path}.")
        warnings.warn(f"Taking over the stale lock {path} of {_describe(holder)}: that process is gone.",
                      stacklevel=2)
        doomed = run_dir / f"{DELETING_PREFIX}{LOCK_FILE}.{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # another run may have taken it over first
            os.rename(path, doomed)
            doomed.unlink()
    raise UserError(f"Could not take the lock {path}: other runs keep taking it. Use another --output-dir.")


def release_lock(path: Path) -> None:
    holder = _read_lock(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink()


# ----------------------------------------------------------------------------- --overwrite without loss


def _entries_of_run(run_dir: Path) -> list[Path]:
    """What belongs to the run in `run_dir`: everything but the lock and the replacement machinery."""
    return [entry for entry in run_dir.iterdir()
            if entry.name not in (LOCK_FILE, REPLACED_DIR, REPLACING_DIR)
            and not entry.name.startswith((DELETING_PREFIX, f".{LOCK_FILE}."))]


def _displace(run_dir: Path) -> None:
    """Move the old run aside (each entry one rename); complete only once REPLACING_DIR is renamed."""
    staging = run_dir / REPLACING_DIR
    staging.mkdir()
    for entry in _entries_of_run(run_dir):
        os.rename(entry, staging / entry.name)
    os.rename(staging, run_dir / REPLACED_DIR)


def _restore(run_dir: Path) -> None:
    """Put the moved-aside old run back: first the new run's entries go (into a `.deleting-*` folder), then the
    mark says so, then the old entries move back; a kill in between resumes at the right half."""
    replaced = run_dir / REPLACED_DIR
    mark = replaced / RESTORING_MARK
    if not mark.exists():
        trash = run_dir / f"{DELETING_PREFIX}new-run-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        for entry in _entries_of_run(run_dir):
            os.rename(entry, trash / entry.name)
        mark.touch()
    for entry in replaced.iterdir():
        if entry.name != RESTORING_MARK:
            os.rename(entry, run_dir / entry.name)
    mark.unlink()
    replaced.rmdir()
    clean_leftovers(run_dir)


def _made_progress(run_dir: Path) -> bool:
    """The new run has something worth more than the old run: a checkpoint (its own or a stage's) or a summary."""
    if (run_dir / "summary.json").exists():
        return True
    return any(REPLACED_DIR not in path.parts and REPLACING_DIR not in path.parts
               for path in run_dir.glob("**/checkpoints/step-*/manifest.json"))


def _repair_interrupted_replacement(run_dir: Path) -> None:
    """A run killed during an --overwrite: finish moving its predecessor back, or delete it when the new run
    had already checkpointed."""
    replacing = run_dir / REPLACING_DIR
    if replacing.exists():  # killed while moving the old run aside: the new run had written nothing yet
        for entry in replacing.iterdir():
            os.rename(entry, run_dir / entry.name)
        replacing.rmdir()
        warnings.warn(f"{run_dir}: an --overwrite was interrupted while moving the old run aside; the old run "
                      f"is back in place.", stacklevel=3)
    replaced = run_dir / REPLACED_DIR
    if not replaced.exists():
        return
    if (replaced / RESTORING_MARK).exists() or not _made_progress(run_dir):
        _restore(run_dir)
        warnings.warn(f"{run_dir}: an --overwrite run stopped before its first checkpoint; the run it replaced is "
                      f"back in place.", stacklevel=3)
    else:
        remove_tree(replaced)


def first_checkpoint_written() -> None:
    """Called after each checkpoint (`lifecycle`, main process): the runs this process has open now have a checkpoint of
    their own, so the old runs their --overwrite moved aside are deleted."""
    for run in _open_runs():
        if run.displaced:
            remove_tree(run.path / REPLACED_DIR)
            run.displaced = False


def _close(run: OpenRun, succeeded: bool) -> None:
    if run.lock is None:
        return
    try:
        if run.displaced:
            if succeeded or _made_progress(run.path):
                remove_tree(run.path / REPLACED_DIR)
            else:
                _restore(run.path)
                print(f"The new run stopped before its first checkpoint: the run it was to replace is back in "
                      f"{run.path}.", file=sys.stderr, flush=True)
    finally:
        release_lock(run.lock)
        if run.created:
            with contextlib.suppress(OSError):  # only when empty
                run.path.rmdir()


# ----------------------------------------------------------------------------- --resume with a changed recipe


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys: {"a": {"b": [1]}} -> {"a.b.0": 1}."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


_ABSENT = "(absent)"


def recipe_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key whose value differs."""
    before, after = flatten(old), flatten(new)
    return {key: (before.get(key, _ABSENT), after.get(key, _ABSENT))
            for key in sorted(set(before) | set(after)) if before.get(key, _ABSENT) != after.get(key, _ABSENT)}


def _schedule_ignores_total(recipe: dict) -> bool:
    training, method = recipe.get("training", {}), recipe.get("method", {})
    warmup_fixed = training.get("warmup_steps", 0) > 0 or training.get("warmup_ratio", 0) == 0
    online_rl = getattr(METHODS.get(str(method.get("name"))), "online_rl", False)
    d3s = online_rl and method.get("rl", {}).get("d3s", {}).get("enabled", False)
    return training.get("lr_scheduler") in ("constant", "constant_with_warmup") and warmup_fixed and not d3s


def is_resume_safe(key: str, old: dict, new: dict) -> bool:
    """Whether changing `key` on resume leaves the training trajectory as it was (see RESUME_SAFE_KEYS)."""
    if key == "training.max_steps":
        return _schedule_ignores_total(old) and _schedule_ignores_total(new)
    return any(key.startswith(safe[:-1]) if safe.endswith("*") else key == safe for safe in RESUME_SAFE_KEYS)


def _normalised(old: dict) -> dict:
    """The stored recipe with today's defaults filled in, so that a key added since is no change."""
    from .config import Recipe

    try:
        return Recipe.model_validate(old).model_dump(mode="json")
    except Exception:  # a recipe of an older schema: compare it as written
        return old


def check_recipe_change(run_dir: Path, recipe_text: str, allow_recipe_change: bool) -> None:
    import yaml

    stored = run_dir / RECIPE_FILE
    if not stored.exists():
        warnings.warn(f"{stored} is missing: the recipe of the resumed run cannot be compared.", stacklevel=3)
        return
    old, new = _normalised(yaml.safe_load(stored.read_text()) or {}), yaml.safe_load(recipe_text)
    changes = recipe_changes(old, new)
    listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changes.items())
    unsafe = {key for key in changes if not is_resume_safe(key, old, new)}
    if unsafe and not allow_recipe_change:
        shown = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in sorted(unsafe))
        raise UserError(f"--resume: the recipe differs from the one the run in '{run_dir}' was started with "
                        f"({stored}) in keys that change the training: {shown}. On resume only these may change: "
                        f"{', '.join(RESUME_SAFE_KEYS)}, and {MAX_STEPS_RULE}. Pass --allow-recipe-change to resume "
                        f"with the new values anyway, or start a new run (--overwrite, or --output-dir).")
    if changes:
        warnings.warn(f"Resuming {run_dir} with recipe changes: {listed}.", stacklevel=3)


# ----------------------------------------------------------------------------- opening the directory


def _recipe_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _holds_run(run_dir: Path, marker: str | None) -> bool:
    if marker is not None:
        return (run_dir / marker).exists()
    # before.json too: a run killed before its first logged step left its starting measurement
    return bool(list_checkpoints(run_dir) or any((run_dir / name).exists()
                                                 for name in ("summary.json", "metrics.jsonl", "before.json")))


def _resumable_checkpoint(run_dir: Path) -> None:
    """The newest checkpoint must verify; newer broken ones are removed (the run recomputes their steps)."""
    found, skipped = broken_checkpoints(run_dir)
    for checkpoint, problem in skipped:
        if found is not None:
            warnings.warn(f"Skipping checkpoint {checkpoint}: {problem}. Resuming from {found.name}; the broken "
                          f"checkpoint is removed.", stacklevel=3)
            remove_tree(checkpoint)
    if found is None:
        reasons = "; ".join(f"{c.name}: {p}" for c, p in skipped) or "none was written"
        raise UserError(f"--resume: '{run_dir}' has no complete checkpoint to resume from ({reasons}). Run without "
                        f"--resume (with --overwrite) to start again.")


def _open(run_dir: Path, recipe_text: str, resume: bool, overwrite: bool, allow_recipe_change: bool,
          marker: str | None) -> OpenRun:
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(run_dir)
    try:
        _repair_interrupted_replacement(run_dir)
        clean_leftovers(run_dir)
        started = _holds_run(run_dir, marker)
        if started and not resume and not overwrite:
            raise UserError(f"Output directory '{run_dir}' already holds a run. Pass --resume to continue it, "
                            f"--overwrite to replace it, or --output-dir to write elsewhere.")
        if resume:
            if marker is not None and not started:
                raise UserError(f"--resume: '{run_dir}' holds no run to resume (no {marker}). Run without --resume "
                                f"to start.")
            if marker is None and not list_checkpoints(run_dir):
                raise UserError(f"--resume: '{run_dir}' has no checkpoint to resume from. Run without --resume "
                                f"to start.")
            check_recipe_change(run_dir, recipe_text, allow_recipe_change)
            if marker is None:  # after the recipe check: a refused resume removes nothing
                _resumable_checkpoint(run_dir)
        return OpenRun(run_dir, lock, created, overwrite and started and not resume, recipe_text)
    except BaseException:
        release_lock(lock)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _shared(state, problem: str | None) -> str | None:
    """The main process's verdict, on every process (so that none waits at a barrier for a main that gave up)."""
    if state.num_processes == 1:
        return problem
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([problem], from_process=0)[0]


def run_dir_of(recipe, recipe_path: Path | None, output_dir: str | None) -> Path:
    stem = recipe_path.stem if recipe_path else "run"
    return Path(output_dir or recipe.output.dir.format(recipe=stem))


def resolve_run_dir(recipe, recipe_path: Path | None, output_dir: str | None, resume: bool, overwrite: bool,
                    allow_recipe_change: bool = False, marker: str | None = None) -> Path:
    """Open the run directory under the rules of the module docstring (main process; the others wait) and
    register it with the innermost `run_scope`. `marker`: the file whose presence means "a run was started
    here" (the iterative loops'); by default a checkpoint, before.json, metrics.jsonl or summary.json."""
    run_dir = run_dir_of(recipe, recipe_path, output_dir)
    recipe_text = _recipe_yaml(recipe)
    state = _processes()
    state.wait_for_everyone()  # every process looked at the directory before the main process changes it
    run, problem = None, None
    if state.is_main_process:
        try:
            run = _open(run_dir, recipe_text, resume, overwrite, allow_recipe_change, marker)
        except UserError as error:
            problem = str(error)
        except BaseException:
            _shared(state, f"the main process failed while opening '{run_dir}' (see its traceback)")
            raise
    problem = _shared(state, problem)
    if problem is not None:
        raise UserError(problem)
    if run is None:  # another process: it follows the main one's decisions
        run = OpenRun(run_dir, None, False, False, recipe_text)
    if _frames:
        _frames[-1].append(run)
    else:  # called outside any runner: hold the lock until the process ends
        import atexit

        _unscoped.append(run)
        atexit.register(_close, run, True)
    state.wait_for_everyone()
    return run_dir


def begin_writing(run_dir: Path) -> None:
    """The run validated its recipe and loaded its inputs, and now starts writing into `run_dir`: an --overwrite
    moves the old run aside, and recipe.yaml is (re)written."""
    state = _processes()
    run = next((r for r in reversed(_open_runs()) if r.path == run_dir), None)
    if state.is_main_process and run is not None and run.lock is not None:
        if run.replace_previous and not run.displaced:
            _displace(run_dir)
            run.displaced = True
        staging = run_dir / f".{RECIPE_FILE}.tmp"
        staging.write_text(run.recipe_text)
        os.replace(staging, run_dir / RECIPE_FILE)
    state.wait_for_everyone()

