"""Atomic, verified checkpoints of the whole training state, keep-last-N, and finding the one to resume.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
run killed mid-save leaves the previous checkpoint intact and never a half one. The last file written
inside the temporary directory is `manifest.json` (every other file's size and sha256): a checkpoint is
complete only when its manifest is there, and on resume it is verified against the manifest, so a file
truncated or emptied later (a full disk, a copy cut short) is found and the run falls back to the newest
checkpoint that verifies. Deleting a checkpoint renames it to a hidden `.deleting-*` name first, so a kill
during the deletion never leaves a half-deleted step that still looks complete.

The model, optimiser, scheduler and RNG states go through `Accelerator.save_state` (which also knows
DeepSpeed and FSDP); `trainer_state.json` adds the step and the data position. LoRA runs store only the
adapter weights (and, as the optimiser holds only them, their optimiser state): the frozen base is the
recipe's model, loaded again on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
DELETING_PREFIX = ".deleting-"
STAGING_PREFIX = ".tmp-step-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_CHUNK = 1 << 20


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest, written last), oldest first. Not verified: see
    `checkpoint_problem`."""
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def remove_tree(path: Path) -> None:
    """Delete a directory in a way a kill cannot leave half-done under its own name: one atomic rename to a
    hidden `.deleting-*` sibling, then the deletion of that (`clean_leftovers` finishes one cut short)."""
    if not path.exists():
        return
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> None:
    """Remove what a killed run left half-written or half-deleted: `.deleting-*` directories, checkpoint staging
    directories, final-model staging directories. Only while holding the run directory's lock."""
    for folder in (run_dir, checkpoint_root(run_dir)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not entry.name.startswith((DELETING_PREFIX, STAGING_PREFIX, ".final_model.")):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Size and sha256 of every file under `directory`, written atomically as its manifest."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    write_json_atomic(directory / MANIFEST_FILE, {"files": files})


_verified: dict[tuple, str | None] = {}  # the files' (name, size, mtime) -> problem: unchanged files hashed once


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing or unreadable manifest, a file missing, of the wrong
    size or hash, an unreadable trainer state), or None when every file matches its manifest."""
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    key = (str(checkpoint.resolve()), *sorted((p.relative_to(checkpoint).as_posix(), p.stat().st_size,
                                               p.stat().st_mtime_ns) for p in checkpoint.rglob("*") if p.is_file()))
    if key not in _verified:
        _verified[key] = _first_problem(checkpoint, manifest_path)
    return _verified[key]


def _first_problem(checkpoint: Path, manifest_path: Path) -> str | None:
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    if STATE_FILE not in files:
        return f"the manifest lists no {STATE_FILE}"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable"
    return None


def broken_checkpoints(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with the reason of each."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies against its manifest; newer broken ones are skipped with a
    warning naming each."""
    found, skipped = broken_checkpoints(run_dir)
    for checkpoint, problem in skipped:
        warnings.warn(f"Skipping checkpoint {checkpoint}: {problem}. Resuming from "
                      f"{found.name if found else 'nothing'} instead.", stacklevel=2)
    return found


def _is_lora(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    inner = getattr(model, "module", model)  # DDP
    return isinstance(inner, PeftModel)


def _model_file(index: int) -> str:
    from accelerate.utils import SAFE_MODEL_NAME  # Accelerate's own naming of the i-th model's file

    return f"{SAFE_MODEL_NAME}{f'_{index}' if index else ''}.safetensors"


def _trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _adapter_hooks(accelerator) -> list:
    """Save/load hooks that keep only the trainable (adapter) tensors of LoRA models in `model.safetensors`.
    Only where Accelerate hands the state dicts to the hooks (one device, DDP): under FSDP and DeepSpeed the
    engine writes its own (full, sharded) files and these runs keep the full save."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                        DistributedType.MEGATRON_LM):
        return []
    if not any(_is_lora(model) for model in accelerator._models):
        return []

    def keep_adapters(models, weights, _output_dir):
        for index, model in enumerate(models):
            if _is_lora(model):
                trainable = _trainable_names(model)
                weights[index] = {name: tensor for name, tensor in weights[index].items() if name in trainable}

    def load_adapters(models, input_dir):
        from safetensors.torch import load_file

        for index, model in reversed(list(enumerate(models))):
            if not _is_lora(model):
                continue
            state = load_file(os.path.join(input_dir, _model_file(index)))
            if set(state) != _trainable_names(model):
                raise ValueError(f"{input_dir}: the adapter weights do not match the model's LoRA parameters "
                                 f"(was the checkpoint written with another peft configuration?)")
            model.load_state_dict(state, strict=False)  # the keys were checked above: only the base is left out
            models.pop(index)  # loaded here: Accelerate's strict full-model load skips it

    return [accelerator.register_save_state_pre_hook(keep_adapters),
            accelerator.register_load_state_pre_hook(load_adapters)]


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:07d}"
    staging = root / f"{STAGING_PREFIX}{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    hooks = _adapter_hooks(accelerator)
    try:
        accelerator.save_state(output_dir=str(staging), safe_serialization=True)
    finally:
        for hook in hooks:
            hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        write_manifest(staging)  # last: a checkpoint without its manifest is not complete
        remove_tree(final)
        os.replace(staging, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    hooks = _adapter_hooks(accelerator)
    try:
        accelerator.load_state(str(checkpoint))
    finally:
        for hook in hooks:
            hook.remove()
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_json_atomic(path: Path, payload: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(staging, path)
