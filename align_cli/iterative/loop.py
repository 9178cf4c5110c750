"""What the iterative methods share: the run directory and its resumable phases, the derived recipe of each
iteration or stage, calling the pairwise trainer into a sub-directory, held-out task accuracy, the table.

Several processes (`align train --accelerate-config ...`): every process runs the loop; the training phase
is the distributed pairwise trainer; sampling is split across the processes (`sharded`: each samples its
slice of the prompts, and the slices are gathered back in order); every other phase is computed and written
by the main process while the others wait at a barrier, then all read the same file.

Resuming: every phase of an iteration (samples, rankings, pairs, evaluation) writes one file atomically
and is skipped when that file exists; the training phase is the pairwise trainer's own run directory
(`iteration-N/train/`), which resumes from its last checkpoint. A killed run therefore continues at the
iteration, phase and step where it stopped, and never regenerates a finished iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import broken_checkpoints, write_json_atomic
from ..config import Recipe
from ..errors import UserError
from ..recipe import set_dotted_key
from ..run_dir import begin_writing, resolve_run_dir

MARKER = "iterative.json"


def processes():
    """The processes of an `accelerate launch` (accelerate's `PartialState`; one process without a launcher)."""
    from accelerate import PartialState

    # cpu=True as the trainer's Accelerator has it without a GPU: else accelerate sees one process on CPU
    return PartialState(cpu=not torch.cuda.is_available())


def open_run_dir(recipe: Recipe, recipe_path: Path | None, output_dir: str | None, resume: bool,
                 overwrite: bool, allow_recipe_change: bool = False) -> Path:
    """The run directory of an iterative method, with the pairwise trainer's rules (`run_dir.resolve_run_dir`:
    lock, resume only with an unchanged recipe, an --overwrite's old run kept until the first checkpoint); a
    run was started here when its MARKER exists. The loops load their inputs phase by phase, so the old run is
    moved aside now, and put back if the new run fails before any stage wrote a checkpoint."""
    run_dir = resolve_run_dir(recipe, recipe_path, output_dir, resume, overwrite, allow_recipe_change, marker=MARKER)
    begin_writing(run_dir)
    state = processes()
    if state.is_main_process and not resume:
        write_json_atomic(run_dir / MARKER, {"method": recipe.method.name, "started": time.time()})
    state.wait_for_everyone()
    return run_dir


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    os.replace(staging, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished_or_computed(path: Path, compute: Callable, write: Callable, read: Callable, every_process: bool):
    """A phase's result: read from its file, or computed now (by the main process alone, or by every process
    when `compute` splits its own work across them) and written atomically by the main process."""
    state = processes()
    done = path.exists()
    state.wait_for_everyone()  # nobody may see the file the main process is about to write as "already done"
    if not done and (every_process or state.is_main_process):
        result = compute()
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path, result)
    state.wait_for_everyone()
    return read(path)


def phase(path: Path, compute: Callable[[], list[dict]], every_process: bool = False) -> list[dict]:
    """The rows of a finished phase from its file, or computed now and written atomically."""
    return _finished_or_computed(path, compute, write_jsonl, read_jsonl, every_process)


def json_phase(path: Path, compute: Callable[[], dict], every_process: bool = False) -> dict:
    return _finished_or_computed(path, compute, write_json_atomic, lambda p: json.loads(p.read_text()), every_process)


def sharded(items: list, compute: Callable[[list, int], list]) -> list:
    """`compute(items, rank)` with the items split across the processes (process r takes items r, r+n, ...),
    the results gathered back in the items' order. One process: `compute(items, 0)`."""
    state = processes()
    if state.num_processes == 1:
        return compute(items, 0)
    from accelerate.utils import gather_object

    mine = compute(items[state.process_index::state.num_processes], state.process_index)
    slices = gather_object([mine])  # one list per process, in rank order
    results: list = [None] * len(items)
    for rank, part in enumerate(slices):
        results[rank::state.num_processes] = part
    return results


def require_reference_loss(recipe: Recipe) -> None:
    """APO and Curry-DPO work through the reference (the anchor, the previous stage): a loss must use one."""
    from ..pairwise.objective import Objective

    if not Objective(recipe.method.losses).needs_reference:
        names = ", ".join(term.name for term in recipe.method.losses)
        raise UserError(f"method {recipe.method.name} trains each step against a reference (its anchor), but the losses "
                        f"({names}) use none. Use a reference-based pairwise loss such as dpo, ipo or sppo.")


def derive_recipe(recipe: Recipe, changes: dict) -> Recipe:
    """A copy of `recipe` with dotted keys replaced (`{"model.name": ...}`), validated again."""
    data = recipe.model_dump(mode="json")
    for dotted, value in changes.items():
        set_dotted_key(data, dotted.split("."), value, f"derived recipe key {dotted}")
    return Recipe.model_validate(data)


def train_stage(recipe: Recipe, folder: Path, reference_logps=None, on_step_end=None,
                allow_recipe_change: bool = False) -> dict:
    """Run the pairwise trainer into `folder`: its summary when it finished before, a resume from its last
    checkpoint that verifies when it stopped part-way, else a fresh start (replacing a start killed before any
    complete checkpoint). `allow_recipe_change`: the iterative run's --allow-recipe-change."""
    from ..pairwise.trainer import train

    summary_path = folder / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    resume = broken_checkpoints(folder)[0] is not None
    return train(recipe, None, str(folder), resume=resume, overwrite=not resume, on_step_end=on_step_end,
                 reference_logps=reference_logps, allow_recipe_change=allow_recipe_change)


def set_threads(recipe: Recipe) -> None:
    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)


def task_evaluation(location: str, recipe: Recipe, rows: list[dict]) -> dict:
    """Greedy held-out task accuracy of a checkpoint (the verifier of `evaluation.task`)."""
    from ..measurements import task_accuracy
    from ..models import load_for_inference, load_tokenizer, resolve_dtype

    if not rows:
        return {}
    model = load_for_inference(location, recipe.model, resolve_dtype(recipe.model.dtype))
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"name": location, "tokenizer": None}),
                               recipe.data.chat_template)
    evaluation = recipe.evaluation
    return task_accuracy(model, tokenizer, rows, evaluation.max_new_tokens, evaluation.batch_size,
                         recipe.data.system_prompt)


# Process r samples with seed + r * this: the processes' random streams never coincide.
PROCESS_SEED_STRIDE = 1_000_003


def sample_across_processes(sampler, tokenizer, prompts: list, settings, workdir: Path, **engine_options):
    """`iterative.sampling.sample_responses` with the prompts split across the processes (`sharded`). With one process
    it is exactly `sample_responses`; with several, process r samples with seed + r * PROCESS_SEED_STRIDE,
    so the samples depend on the process count (like the data order of a distributed run)."""
    from dataclasses import replace

    from .sampling import sample_responses

    made: dict = {}

    def draw(part: list, rank: int) -> list:
        responses, info = sample_responses(sampler, tokenizer, part,
                                           replace(settings, seed=settings.seed + PROCESS_SEED_STRIDE * rank),
                                           workdir=workdir / f"process-{rank}" if rank else workdir, **engine_options)
        made.update(info)
        return responses

    responses = sharded(prompts, draw)
    return responses, {**made, "processes": processes().num_processes}


def link_final_model(run_dir: Path, final_model: str | None) -> str | None:
    """`run_dir/final_model` pointing at the last iteration's model (a relative link: the run dir can move)."""
    if final_model is None:
        return None
    link = run_dir / "final_model"
    state = processes()
    state.wait_for_everyone()
    if not state.is_main_process:
        return str(link)
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(os.path.relpath(final_model, run_dir))
    return str(link)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table: `columns` are (key, header); floats with 3 decimals, missing as '-'."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in body)) if body else len(header)
              for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(header.rjust(width) for (_, header), width in zip(columns, widths))]
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths)) for line in body]
    return "\n".join(lines)


def train_row(summary: dict) -> dict:
    """The columns of an iteration's table that come from its trainer summary."""
    final, after = summary.get("final_train_metrics") or {}, summary.get("after") or {}
    return {"steps": summary.get("steps"), "train_loss": final.get("loss"),
            "train_reward_accuracy": final.get("rewards/accuracies"), "train_margin": final.get("rewards/margins"),
            "eval_loss": after.get("loss"), "eval_reward_accuracy": after.get("rewards/accuracies"),
            "tokens_per_second": summary.get("tokens_per_second"), "train_seconds": summary.get("train_seconds")}
