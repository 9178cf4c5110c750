"""APO: iterative preference optimisation accelerated by Nesterov momentum (He, Yuan, Gu 2024,
"Accelerated Preference Optimization"; docs/ALGORITHMS.md section 6). alpha = 0 is iterative DPO.

Iteration t = 1..T, with pihat_0 = the starting model and pi_{t-1} the anchor:
1. sample K responses per prompt (a fresh slice of `data.train` prompts) from pi_{t-1};
2. score them with the ranker and keep best vs worst (prompts whose responses all tie give no pair);
3. proximal step: train the pairwise loss from pihat_{t-1} with reference pi_{t-1}, giving pihat_t;
4. momentum: pi_t = (1+alpha)*log pihat_t - alpha*log pihat_{t-1} - log Z(x), which only ever enters as
   reference log-probs computed from the two frozen checkpoints (`extrapolation.AnchorLogps`) and as the
   sampling policy of the next iteration (`sample_from`). log Z(x) cancels in margin losses (dpo, cdpo, rdpo,
   hinge); for the others (sppo, ipo, fdpo other than reverse KL) it is estimated per prompt from the
   iteration's K samples, which must then be draws from pihat_t itself (`require_estimable_normaliser`).
pi_0 = pihat_0, so iteration 1 is the same for every alpha. Held-out task accuracy is measured on the
trained weights pihat_t after each iteration (greedy decoding, `evaluation`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint import write_json_atomic
from ..config import Recipe
from ..data.sources import train_prompt_rows
from ..errors import UserError
from ..generation import SamplingSettings
from ..lifecycle import write_summary
from ..run_dir import holds_run_directory
from ..run_setup import load_task_rows
from . import loop
from .extrapolation import AnchorLogps, NormaliserSamples, anchor_terms, needs_normalised_anchor
from .pairs import as_row, best_vs_worst
from .rankers import make_ranker, win_probabilities
from .sampling import Sampler

TABLE = [("iteration", "iter"), ("sample_from", "sampled from"), ("pairs", "pairs"), ("tied_prompts", "ties"),
         ("sample_accuracy", "sample acc"), ("sample_mean_score", "sample score"), ("steps", "steps"),
         ("train_loss", "train loss"), ("train_reward_accuracy", "train acc"), ("eval_reward_accuracy", "eval pair acc"),
         ("task_accuracy", "held-out acc"), ("seconds", "seconds")]


def prompt_slice(prompts: list[dict], iteration: int, size: int) -> list[dict]:
    """Iteration t's prompts: the t-th block of `size`, wrapping around (fresh prompts each iteration, as in
    the SPPO/APO pipelines, while there are enough)."""
    start = (iteration - 1) * size
    return [prompts[(start + i) % len(prompts)] for i in range(min(size, len(prompts)))]


def normalised_anchor_losses(recipe: Recipe) -> list[str]:
    """The loss terms that need `log Z(x)` taken off the extrapolated anchor; none without momentum (every
    anchor is then one checkpoint, already normalised) or with a single iteration."""
    config = recipe.method.apo
    if config.alpha == 0 or config.iterations < 2:
        return []
    return needs_normalised_anchor(recipe.method.losses)


def require_estimable_normaliser(recipe: Recipe) -> None:
    """`log Z(x) = log E_{y ~ pihat_t}[(pihat_t(y) / pihat_{t-1}(y))^alpha]` is estimated from the K samples of
    each prompt, which is valid only if they are draws from pihat_t: `sample_from: policy` at temperature 1
    without top-p (an extrapolated sampler, a temperature or a nucleus draws from another distribution)."""
    names = normalised_anchor_losses(recipe)
    config = recipe.method.apo
    wanted = (("sample_from", config.sample_from, "policy"), ("temperature", config.temperature, 1.0),
              ("top_p", config.top_p, 1.0))
    wrong = [f"{key}: {value}" for key, value, right in wanted if value != right]
    if names and wrong:
        raise UserError(
            f"method.apo with alpha {config.alpha:g} and loss {', '.join(sorted(set(names)))}: this loss compares each "
            f"response's log-ratio to the reference on its own, so the extrapolated anchor must be normalised, and "
            f"log Z(x) is estimated from each prompt's {config.samples_per_prompt} samples, which must be draws from "
            f"the trained policy itself. Set method.apo.sample_from: policy, temperature: 1.0 and top_p: 1.0 (now "
            f"{', '.join(wrong)}), or use a margin loss (dpo, cdpo, rdpo, hinge), or alpha: 0.")


def sample_statistics(samples: list[dict], scores: list[list[float]]) -> dict:
    from .. import tasks

    flat = [s for row in scores for s in row]
    stats = {"prompts": len(samples), "samples": len(flat), "sample_mean_score": sum(flat) / max(len(flat), 1),
             "mean_response_chars": sum(len(r) for row in samples for r in row["responses"]) / max(len(flat), 1)}
    if all(row.get("answer") is not None for row in samples):
        correct = [tasks.is_correct(r, row["answer"]) for row in samples for r in row["responses"]]
        stats["sample_accuracy"] = sum(correct) / max(len(correct), 1)
    return stats


def generate_and_rank(recipe: Recipe, config, folder: Path, rows: list[dict], sampler: Sampler, seed: int,
                      ranker_cache) -> tuple[list[dict], list[list[float]], dict]:
    """The iteration's samples and their scores, each phase read back from its file when it finished before."""
    from ..models import load_tokenizer, resolve_dtype

    settings = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_p=config.top_p, num_samples=config.samples_per_prompt, seed=seed,
                                batch_size=config.generation_batch_size)

    def sample() -> list[dict]:
        started = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(recipe.model.model_copy(update={"name": sampler.current}), recipe.data.chat_template)
        responses, info = loop.sample_across_processes(
            sampler, tokenizer, [row["prompt"] for row in rows], settings, folder, model_config=recipe.model,
            dtype=resolve_dtype(recipe.model.dtype), system_prompt=recipe.data.system_prompt, engine=config.engine)
        if loop.processes().is_main_process:
            write_json_atomic(folder / "sampling.json", {**info, "seed": seed, "settings": settings.__dict__,
                                                         "seconds": round(time.time() - started, 1)})
        return [{"prompt": row["prompt"], "answer": row.get("answer"), "responses": texts}
                for row, texts in zip(rows, responses)]

    samples = loop.phase(folder / "samples.jsonl", sample, every_process=True)
    rankings = loop.phase(folder / "rankings.jsonl", lambda: [
        {"scores": scores} for scores in ranker_cache().score(samples, [row["responses"] for row in samples])])
    info = loop.json_phase(folder / "sampling.json", lambda: {})
    return samples, [row["scores"] for row in rankings], info


@holds_run_directory  # the lock on the run directory, released on exit
def run_apo(recipe: Recipe, recipe_path: Path | None = None, output_dir: str | None = None, resume: bool = False,
            overwrite: bool = False, on_step_end=None, allow_recipe_change: bool = False) -> dict:
    config = recipe.method.apo
    loop.require_reference_loss(recipe)
    require_estimable_normaliser(recipe)
    run_dir = loop.open_run_dir(recipe, recipe_path, output_dir, resume, overwrite, allow_recipe_change)
    loop.set_threads(recipe)
    started = time.time()
    prompts = train_prompt_rows(recipe)
    eval_rows = load_task_rows(recipe)
    ranker = []  # built on first use: a resumed run whose rankings exist never loads a reward model

    def get_ranker():
        if not ranker:
            ranker.append(make_ranker(config.ranker, run_dir))
        return ranker[0]

    baseline = loop.json_phase(run_dir / "iteration-0" / "evaluation.json",
                               lambda: loop.task_evaluation(recipe.model.name, recipe, eval_rows))
    table = [{"iteration": 0, "task_accuracy": baseline.get("task_accuracy")}]
    history = [recipe.model.name]  # pihat_0, pihat_1, ...
    summaries = []
    for iteration in range(1, config.iterations + 1):
        iteration_started = time.time()
        folder = run_dir / f"iteration-{iteration}"
        current, previous = history[-1], (history[-2] if len(history) > 1 else None)
        sampler = Sampler(current, previous, config.alpha, config.sample_from)
        rows = prompt_slice(prompts, iteration, config.prompts_per_iteration)
        samples, scores, sampling = generate_and_rank(recipe, config, folder, rows, sampler,
                                                      recipe.training.seed + iteration, get_ranker)

        def build_pairs() -> list[dict]:
            # Every pair carries its responses' win probabilities: SPPO's soft targets (losses that take none ignore them)
            found = [best_vs_worst(i, row["responses"], row_scores,
                                   win_probabilities(config.ranker.name, row_scores))
                     for i, (row, row_scores) in enumerate(zip(samples, scores))]
            return [as_row(pair, samples[pair.prompt_index]["prompt"]) for pair in found if pair is not None]

        pairs = loop.phase(folder / "pairs.jsonl", build_pairs)
        if len(pairs) < recipe.training.batch_size:
            raise UserError(f"APO iteration {iteration}: only {len(pairs)} of {len(samples)} prompts gave a pair (the "
                            f"others' {config.samples_per_prompt} responses all scored the same), fewer than one batch "
                            f"of {recipe.training.batch_size}. Raise method.apo.prompts_per_iteration or "
                            f"samples_per_prompt, or lower training.batch_size.")
        terms = anchor_terms(current, previous, config.alpha)
        normaliser = None
        if len(terms) > 1 and normalised_anchor_losses(recipe):  # these samples are draws from pihat_t = current
            normaliser = NormaliserSamples(current, tuple(row["prompt"] for row in samples),
                                           tuple(tuple(row["responses"]) for row in samples))
        anchor = AnchorLogps(terms, recipe.reference.cache_dir or str(run_dir / "reference_logps"), normaliser)
        stage_recipe = loop.derive_recipe(recipe, {
            "model.name": current, "reference.name": None, "method.name": "dpo",
            "data.train": {"source": str(folder / "pairs.jsonl"), "split": "train"},
            "evaluation.task": None, "output.save_final_model": True, "output.dir": str(folder / "train")})
        summary = loop.train_stage(stage_recipe, folder / "train", reference_logps=anchor, on_step_end=on_step_end,
                                   allow_recipe_change=allow_recipe_change)
        history.append(summary["final_model_dir"])
        evaluation = loop.json_phase(folder / "evaluation.json",
                                     lambda: loop.task_evaluation(history[-1], recipe, eval_rows))
        timing = loop.json_phase(folder / "timing.json", lambda: {"seconds": round(time.time() - iteration_started, 1)})
        summaries.append(summary)
        table.append({"iteration": iteration, **sample_statistics(samples, scores), "pairs": len(pairs),
                      "tied_prompts": len(samples) - len(pairs), "sample_from": sampling.get("sample_from"),
                      "engine": sampling.get("engine"), "reference": anchor.description, **loop.train_row(summary),
                      "task_accuracy": evaluation.get("task_accuracy"),
                      "answer_accuracy_lenient": evaluation.get("answer_accuracy_lenient"), **timing})

    final_model = loop.link_final_model(run_dir, history[-1] if len(history) > 1 else None)
    text = loop.format_table(table, TABLE)
    loop.processes().print(f"\nAPO (alpha={config.alpha}, sample_from={config.sample_from}, "
                           f"ranker={config.ranker.name})\n{text}\n", flush=True)
    speeds = [s["tokens_per_second"] for s in summaries if s.get("tokens_per_second")]
    summary = {"recipe": str(recipe_path) if recipe_path else None, "method": "apo", "model": recipe.model.name,
               "alpha": config.alpha, "sample_from": config.sample_from, "ranker": config.ranker.name,
               "losses": [term.model_dump() for term in recipe.method.losses],
               "iterations": table, "table": text.splitlines(),
               "before": {"task_accuracy": baseline.get("task_accuracy")},
               "after": {"task_accuracy": table[-1].get("task_accuracy")},
               "final_model_dir": final_model,
               "tokens_per_second": round(sum(speeds) / len(speeds), 1) if speeds else 0.0,
               "wall_seconds_this_process": round(time.time() - started, 1)}
    return write_summary(run_dir, summary, loop.processes().is_main_process)
