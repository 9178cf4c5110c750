"""`align generate`: answer a prompt file with a model (a run directory or a checkpoint), revise each answer with
SRPO's self-revision prompt, and write one JSON line per prompt."""

from __future__ import annotations

from .self_revision import revision_scores, self_revise, templates_for_model


def generate_to_file(model_name: str, prompts_source: str, split: str, output: str, revisions: int, settings,
                     num_prompts: int | None = None, recipe_path: str | None = None, engine: str = "auto",
                     revision_settings=None, raw: bool = False) -> dict:
    """`align generate`: answer every prompt, revise each answer `revisions` times, and write one JSON line per
    prompt with `revisions: [y_0, ..., y_K]` (and, where the rows carry an `answer`, whether each is correct by the
    shipped task's verifier). Returns a summary (with per-revision scores when answers exist).

    `model_name` may be a run directory of `align train` (its final_model/, as `align eval` takes it); string
    prompts go through the chat template unless `raw`, by the rule `align eval` follows (`instruction_prompt`)."""
    import json
    from pathlib import Path

    from . import tasks
    from .config import ModelConfig
    from .data.sources import load_source
    from .engine import open_engine
    from .errors import UserError
    from .eval.runner import resolve_model_dir
    from .generation import instruction_prompt
    from .models import load_tokenizer, resolve_dtype

    model_name = resolve_model_dir(model_name)
    dataset = load_source(prompts_source, split)
    if "prompt" not in dataset.column_names:
        raise UserError(f"Prompts '{prompts_source}' need a 'prompt' column (string or chat messages); found "
                        f"{', '.join(dataset.column_names)}.")
    rows = [dataset[i] for i in range(min(num_prompts or len(dataset), len(dataset)))]
    templates, system_prompt, origin = templates_for_model(model_name, recipe_path)
    config = ModelConfig(name=model_name)
    served_by = open_engine(model_name, load_tokenizer(config), config, resolve_dtype("auto"), engine, system_prompt,
                            settings.seed)
    try:
        asked = [instruction_prompt(r["prompt"], raw) for r in rows]
        chains = self_revise(served_by, asked, revisions, settings, templates, revision_settings)
    finally:
        served_by.close()
    with_answers = all("answer" in r and r["answer"] is not None for r in rows)
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row, chain in zip(rows, chains):
            record = {"prompt": row["prompt"], "revisions": chain}
            if with_answers:
                record.update(answer=row["answer"], correct=[tasks.is_correct(text, row["answer"]) for text in chain])
            handle.write(json.dumps(record) + "\n")
    summary = {"output": str(path), "model": model_name, "prompts": len(rows), "revisions": revisions,
               "templates": origin, "raw": raw, "engine": served_by.name}
    if with_answers:
        summary.update(revision_scores(chains, [r["answer"] for r in rows], tasks.is_correct))
    return summary
