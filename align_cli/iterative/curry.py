"""Curry-DPO: curriculum DPO over several pairs per prompt (Pattnaik et al., EMNLP 2024 Findings;
docs/ALGORITHMS.md section 5).

Each prompt's rated responses give N-1 pairs, the best against each lower-rated one (ties with the best
dropped), ordered easiest first by the chosen criterion:
- `rating_gap`: the larger the rating gap, the easier;
- `reference_margin`: the larger the starting reference's log-prob margin logp(chosen) - logp(rejected),
  the easier (the reference already tells the two apart). Computed once, with the starting reference.
Variants:
- `iterative` (the paper's main one): stage k trains DPO on the k-th easiest pair of every prompt, starting
  from stage k-1's model, which is also stage k's reference;
- `single_stage`: one pass over all pairs, easy to hard (every prompt's easiest pairs, then the next level),
  unshuffled, with the fixed starting reference.
Responses come rated (`responses: rated`: `data.train` rows with a list of {response, score}), or are
sampled from the starting model and scored by the ranker (`responses: generated`).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from ..config import Recipe
from ..data.sources import load_source, train_prompt_rows
from ..errors import UserError
from ..generation import SamplingSettings
from ..lifecycle import write_summary
from ..run_dir import holds_run_directory
from ..run_setup import load_task_rows
from . import loop
from .pairs import Pair, as_row, best_vs_each, curriculum_stages, easy_to_hard, order_by
from .rankers import make_ranker
from .sampling import Sampler

TABLE = [("stage", "stage"), ("pairs", "pairs"), ("mean_gap", "mean gap"), ("steps", "steps"),
         ("train_loss", "train loss"), ("train_reward_accuracy", "train acc"), ("eval_reward_accuracy", "eval pair acc"),
         ("task_accuracy", "held-out acc"), ("seconds", "seconds")]


def rated_rows(recipe: Recipe) -> list[dict]:
    """`{prompt, answer?, responses, scores}` per prompt from rated `data.train` rows (its `columns` map)."""
    source = recipe.data.train
    columns = source.columns
    dataset = load_source(source.source, source.split, source.subset)
    missing = [c for c in (columns.prompt, columns.completions) if c not in dataset.column_names]
    if missing:
        raise UserError(f"Curry-DPO with responses: rated reads data.train rows with a prompt and a list of rated "
                        f"responses; '{source.source}' has no column {', '.join(map(repr, missing))} (columns: "
                        f"{', '.join(dataset.column_names)}). Map them with data.train.columns.prompt/completions/"
                        f"response/score, or set method.curry_dpo.responses: generated.")
    rows = []
    for row in dataset:
        rated = [c for c in row[columns.completions] or []
                 if c.get(columns.response) is not None and c.get(columns.score) is not None]
        rows.append({"prompt": row[columns.prompt], "answer": row.get("answer"),
                     "responses": [c[columns.response] for c in rated],
                     "scores": [float(c[columns.score]) for c in rated]})
    return rows[: source.max_rows] if source.max_rows else rows


def generated_rows(recipe: Recipe, run_dir: Path) -> list[dict]:
    """Responses sampled from the starting model and scored by the ranker."""
    from ..models import load_tokenizer, resolve_dtype

    config = recipe.method.curry_dpo
    prompts = train_prompt_rows(recipe)
    settings = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_p=config.top_p, num_samples=config.samples_per_prompt, seed=recipe.training.seed,
                                batch_size=config.generation_batch_size)
    responses, _ = loop.sample_across_processes(
        Sampler(recipe.model.name), load_tokenizer(recipe.model, recipe.data.chat_template),
        [row["prompt"] for row in prompts], settings, run_dir, model_config=recipe.model,
        dtype=resolve_dtype(recipe.model.dtype), system_prompt=recipe.data.system_prompt, engine=config.engine)
    samples = [{"prompt": row["prompt"], "answer": row.get("answer"), "responses": texts}
               for row, texts in zip(prompts, responses)]
    if not loop.processes().is_main_process:
        return samples  # only the main process's rows are written (`loop.phase`); ranking runs there
    scores = make_ranker(config.ranker, run_dir).score(samples, responses)
    return [{**sample, "scores": row_scores} for sample, row_scores in zip(samples, scores)]


@torch.no_grad()
def reference_margins(recipe: Recipe, rows: list[dict]) -> list[float]:
    """logp_ref(chosen) - logp_ref(rejected) of each preference row under the starting reference, tokenised
    exactly as the trainer tokenises (rows the truncation policy drops get NaN and count as hardest)."""
    import datasets

    from ..data.preference import TokenisationSettings, tokenise_preferences
    from ..models import load_for_inference, load_tokenizer, resolve_dtype
    from ..pairwise.reference import LiveReference, compute_rows

    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    dataset, _ = tokenise_preferences(datasets.Dataset.from_list(rows), tokenizer, TokenisationSettings.from_recipe(recipe),
                                      "curriculum pairs", recipe.data.num_proc)
    model = load_for_inference(recipe.reference.name or recipe.model.name, recipe.model, resolve_dtype(recipe.model.dtype))
    device = next(model.parameters()).device
    live = LiveReference(model, contextlib.nullcontext, recipe.training.fused_logprobs, ["chosen", "rejected"])
    table = {name: torch.full((len(dataset),), float("nan")) for name in live.groups}
    compute_rows(live, dataset, list(range(len(dataset))), tokenizer.pad_token_id, recipe.training.batch_size, device,
                 table)
    margins = [math.nan] * len(rows)
    for position, source_row in enumerate(dataset["source_row"]):
        margins[source_row] = float(table["chosen"][position] - table["rejected"][position])
    return margins


def curriculum(recipe: Recipe, rated: list[dict]) -> list[list[Pair]]:
    """Every prompt's pairs, easiest first by the recipe's criterion."""
    per_prompt = [best_vs_each(i, row["responses"], row["scores"]) for i, row in enumerate(rated)]
    if recipe.method.curry_dpo.criterion == "reference_margin":
        flat = [pair for pairs in per_prompt for pair in pairs]
        margins = iter(reference_margins(recipe, [as_row(p, rated[p.prompt_index]["prompt"]) for p in flat]))
        per_prompt = [order_by(pairs, [(-m if not math.isnan(m) else math.inf) for m in
                                       [next(margins) for _ in pairs]]) for pairs in per_prompt]
    return [pairs for pairs in per_prompt if pairs]


def _stage_row(stage: int, pairs: list[dict], summary: dict, evaluation: dict, seconds: dict) -> dict:
    gaps = [row["chosen_score"] - row["rejected_score"] for row in pairs]
    return {"stage": stage, "pairs": len(pairs), "mean_gap": sum(gaps) / max(len(gaps), 1), **loop.train_row(summary),
            "task_accuracy": evaluation.get("task_accuracy"),
            "answer_accuracy_lenient": evaluation.get("answer_accuracy_lenient"), **seconds}


@holds_run_directory  # the lock on the run directory, released on exit
def run_curry(recipe: Recipe, recipe_path: Path | None = None, output_dir: str | None = None, resume: bool = False,
              overwrite: bool = False, on_step_end=None, allow_recipe_change: bool = False) -> dict:
    config = recipe.method.curry_dpo
    loop.require_reference_loss(recipe)
    run_dir = loop.open_run_dir(recipe, recipe_path, output_dir, resume, overwrite, allow_recipe_change)
    loop.set_threads(recipe)
    started = time.time()
    rated = loop.phase(run_dir / "rated.jsonl",
                       lambda: rated_rows(recipe) if config.responses == "rated" else generated_rows(recipe, run_dir),
                       every_process=config.responses == "generated")
    per_prompt = curriculum(recipe, rated)
    if config.variant == "iterative":
        stages = curriculum_stages(per_prompt, config.stages)
    else:
        stages = [easy_to_hard(per_prompt, config.stages)]
    if not stages or len(stages[0]) < recipe.training.batch_size:
        raise UserError(f"Curry-DPO: {sum(map(len, per_prompt))} pairs from {len(rated)} prompts (responses tied with "
                        f"the best are dropped), fewer than one batch of {recipe.training.batch_size} in the first stage. "
                        f"Use more prompts or responses, or lower training.batch_size.")
    eval_rows = load_task_rows(recipe)
    baseline = loop.json_phase(run_dir / "stage-0" / "evaluation.json",
                               lambda: loop.task_evaluation(recipe.model.name, recipe, eval_rows))
    table = [{"stage": 0, "task_accuracy": baseline.get("task_accuracy")}]
    current = recipe.model.name
    for number, stage_pairs in enumerate(stages, start=1):
        stage_started = time.time()
        folder = run_dir / f"stage-{number}"
        rows = loop.phase(folder / "pairs.jsonl", lambda: [as_row(p, rated[p.prompt_index]["prompt"]) for p in stage_pairs])
        if len(rows) < recipe.training.batch_size:
            print(f"Curry-DPO: stage {number} has {len(rows)} pairs, fewer than one batch; the curriculum ends at "
                  f"stage {number - 1}.", flush=True)
            break
        changes = {"model.name": current, "method.name": "dpo", "evaluation.task": None,
                   "data.train": {"source": str(folder / "pairs.jsonl"), "split": "train"},
                   "output.save_final_model": True, "output.dir": str(folder / "train")}
        if config.variant == "iterative" and number > 1:
            changes["reference.name"] = None  # None: the stage's starting model, i.e. stage k-1's model, is its reference
        if config.variant == "single_stage":
            changes["training.shuffle"] = False  # the curriculum order is the data order
        summary = loop.train_stage(loop.derive_recipe(recipe, changes), folder / "train", on_step_end=on_step_end,
                                   allow_recipe_change=allow_recipe_change)
        current = summary["final_model_dir"]
        evaluation = loop.json_phase(folder / "evaluation.json", lambda: loop.task_evaluation(current, recipe, eval_rows))
        seconds = loop.json_phase(folder / "timing.json", lambda: {"seconds": round(time.time() - stage_started, 1)})
        table.append(_stage_row(number, rows, summary, evaluation, seconds))

    final_model = loop.link_final_model(run_dir, current if current != recipe.model.name else None)
    text = loop.format_table(table, TABLE)
    loop.processes().print(f"\nCurry-DPO ({config.variant}, criterion {config.criterion})\n{text}\n", flush=True)
    summary = {"recipe": str(recipe_path) if recipe_path else None, "method": "curry_dpo", "model": recipe.model.name,
               "variant": config.variant, "criterion": config.criterion, "responses": config.responses,
               "prompts": len(rated), "pairs_per_stage": [len(stage) for stage in stages],
               "stages": table, "table": text.splitlines(),
               "before": {"task_accuracy": baseline.get("task_accuracy")},
               "after": {"task_accuracy": table[-1].get("task_accuracy")},
               "final_model_dir": final_model, "tokens_per_second": table[-1].get("tokens_per_second") or 0.0,
               "wall_seconds_this_process": round(time.time() - started, 1)}
    return write_summary(run_dir, summary, loop.processes().is_main_process)
