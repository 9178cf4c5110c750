"""SRPO's two prompts and self-revision at inference (docs/ALGORITHMS.md section 4).

One network plays two roles (Choi et al., ICLR 2025, "Self-Improving Robust Preference Optimization",
arXiv:2406.01660): the generative policy `pi(y|x)` answers the plain prompt; the self-improvement policy
`pi(y'|x, y)` answers the same prompt with a previous answer `y` shown as an example to improve on.
Training (data/srpo.py), reference scoring and inference (`self_revise`) all build prompts with
`generation_prompt` and `revision_prompt`, so the templates cannot drift apart.

Inference: `y_0 ~ pi(.|x)`, then `y_{k+1} ~ pi(.|x, y_k)` for k revisions; every revision is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DEFAULT_REVISION_TEMPLATE


@dataclass(frozen=True)
class Templates:
    generate: str = "{prompt}"
    revision: str = DEFAULT_REVISION_TEMPLATE

    @classmethod
    def from_config(cls, srpo_config) -> Templates:
        return cls(srpo_config.generate_template, srpo_config.revision_template)


def _fill(template: str, prompt: str, example: str = "") -> str:
    # str.replace, not str.format: prompts and answers may contain braces.
    return template.replace("{example}", example).replace("{prompt}", prompt)


def _apply(prompt, text_of):
    """Apply `text_of(content)` to a string prompt, or to the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return text_of(prompt)
    messages = [dict(message) for message in prompt]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("an SRPO chat prompt needs a user message to put the template in")
    messages[last_user]["content"] = text_of(messages[last_user]["content"])
    return messages


def answer_text(completion) -> str:
    """The text of a completion: a string, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "\n".join(str(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")


def generation_prompt(prompt, templates: Templates):
    """The generative policy's prompt `x` (string or chat messages)."""
    return _apply(prompt, lambda content: _fill(templates.generate, content))


def revision_prompt(prompt, example: str, templates: Templates):
    """The self-improvement policy's prompt `(x, y)`: the prompt with `example` shown to improve on."""
    return _apply(prompt, lambda content: _fill(templates.revision, content, example))


def self_revise(engine, prompts: list, revisions: int, settings, templates: Templates = Templates(),
                revision_settings=None) -> list[list[str]]:
    """For each prompt, `[y_0, y_1, ..., y_K]`: y_0 answers the generation prompt, y_{k+1} the revision
    prompt showing y_k. `engine` is an `align_cli.engine` engine; `settings` (a `generation.SamplingSettings`,
    num_samples 1) decodes y_0 and, unless `revision_settings` is given, the revisions too."""
    revision_settings = revision_settings or settings
    if settings.num_samples != 1 or revision_settings.num_samples != 1:
        raise ValueError("self-revision generates one answer per prompt and round (num_samples=1)")
    first = engine.generate([generation_prompt(p, templates) for p in prompts], settings)
    chains = [[samples[0]] for samples in first]
    for _ in range(revisions):
        asked = [revision_prompt(p, chain[-1], templates) for p, chain in zip(prompts, chains)]
        for chain, samples in zip(chains, engine.generate(asked, revision_settings)):
            chain.append(samples[0])
    return chains


def revision_scores(chains: list[list[str]], answers: list, is_correct) -> dict:
    """Accuracy of each revision and, for k >= 1, how often y_k beats y_0 (correct where y_0 is not) or
    loses to it; `revision_k/win_rate_vs_0` = wins / (wins + losses), ties left out (None without any)."""
    correct = [[bool(is_correct(text, answer)) for text in chain] for chain, answer in zip(chains, answers)]
    results: dict = {}
    for k in range(len(correct[0]) if correct else 0):
        results[f"revision_{k}/accuracy"] = sum(row[k] for row in correct) / len(correct)
        if k == 0:
            continue
        wins = sum(row[k] and not row[0] for row in correct)
        losses = sum(row[0] and not row[k] for row in correct)
        results[f"revision_{k}/wins_vs_0"] = wins
        results[f"revision_{k}/losses_vs_0"] = losses
        results[f"revision_{k}/win_rate_vs_0"] = wins / (wins + losses) if wins + losses else None
    return results


def revision_evaluation(model, tokenizer, rows: list[dict], revisions: int, templates: Templates,
                        max_new_tokens: int, batch_size: int, system_prompt: str | None = None,
                        draft_temperature: float = 0.0, seed: int = 0) -> dict:
    """Self-revision on task rows (`prompt`, `answer`), scored by the shipped task's verifier: all greedy, and,
    with `draft_temperature` > 0, greedy revisions of drafts y_0 sampled at that temperature (`sampled_draft/`)."""
    from dataclasses import replace

    from . import tasks
    from .engine import TransformersEngine
    from .generation import SamplingSettings

    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size, seed=seed)
    engine = TransformersEngine(model, tokenizer, system_prompt)  # the live policy of the run
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    chains = self_revise(engine, prompts, revisions, greedy, templates)
    results = revision_scores(chains, answers, tasks.is_correct)
    results["revision_examples"] = [{"answer": a, "revisions": chain} for a, chain in list(zip(answers, chains))[:3]]
    if draft_temperature > 0:
        drafted = self_revise(engine, prompts, revisions, replace(greedy, temperature=draft_temperature), templates,
                              revision_settings=greedy)
        results.update({f"sampled_draft/{key}": value
                        for key, value in revision_scores(drafted, answers, tasks.is_correct).items()})
    return results


def templates_for_model(model: str, recipe_path: str | None = None) -> tuple[Templates, str | None, str]:
    """The templates (and system prompt) a model was trained with: from `recipe_path` if given, else from the
    `recipe.yaml` of the run directory holding `model` (`runs/NAME/final_model`), else the defaults.
    Returns (templates, system_prompt, where they came from)."""
    from pathlib import Path

    if recipe_path is not None:
        from .recipe import load_recipe

        recipe, path = load_recipe(recipe_path)
        return Templates.from_config(recipe.method.srpo), recipe.data.system_prompt, str(path)
    run_recipe = Path(model).expanduser() / ".." / "recipe.yaml"
    if Path(model).expanduser().is_dir() and run_recipe.is_file():
        import yaml

        from .config import Recipe

        recipe = Recipe.model_validate(yaml.safe_load(run_recipe.read_text()))
        return Templates.from_config(recipe.method.srpo), recipe.data.system_prompt, str(run_recipe.resolve())
    return Templates(), None, "defaults"


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
