"""SRPO's two prompts and self-revision at inference (docs/ALGORITHMS.md section 4).

One network plays two roles (Choi et al., ICLR 2025, "Self-Improving Robust Preference Optimization",
arXiv:2406.01660): the generative policy `pi(y|x)` answers the plain prompt; the self-improvement policy
`pi(y'|x, y)` answers the same prompt with a previous answer `y` shown as an example to improve on.
Training (data/srpo.py), reference scoring and inference (`self_revise`) all build prompts with
`data.render.generation_prompt` and `revision_prompt`, so the templates cannot drift apart.

Inference: `y_0 ~ pi(.|x)`, then `y_{k+1} ~ pi(.|x, y_k)` for k revisions; every revision is kept.
"""

from __future__ import annotations

from .data.render import Templates, generation_prompt, revision_prompt


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


