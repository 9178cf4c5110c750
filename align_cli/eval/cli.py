"""`align eval ...` (evaluate a model) and `align eval metrics FILE` (recompute metrics), as one Typer
group: the group's callback runs the evaluation when no subcommand is named."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer

from ..errors import UserError

eval_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                       help="Evaluate a model AlpacaEval-style (win rate against reference outputs), or recompute "
                            "metrics from an annotations file with `align eval metrics FILE`.")

_SHOWN = ["win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "discrete_win_rate",
          "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"]


def _jsonable(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2))
        return
    for key in _SHOWN:
        value = metrics.get(key)
        text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
            f"{value:.2f}" if isinstance(value, float) else str(value))
        typer.echo(f"{key:26s} {text}")


@eval_app.callback()
def evaluate(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="A run directory of align train, an HF model directory, builtin:NAME or a hub id."),
    instructions: str | None = typer.Option(None, "--instructions", help="alpaca_eval JSON/JSONL {instruction, output, generator, dataset}, or builtin:NAME[:SPLIT] (default split: test)."),
    reference: str | None = typer.Option(None, "--reference", help="Reference outputs (alpaca_eval format), joined on the instruction text. Default: the instruction file's own `output` (gold answers for builtin sets)."),
    judge: str | None = typer.Option(None, "--judge", help="rule | reward_model | openai."),
    output_dir: Path = typer.Option(Path("runs/eval"), "--output-dir", help="Evaluation directory; several models can share one."),
    name: str | None = typer.Option(None, "--name", help="Model name in outputs and leaderboard (default: from --model)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only the first N instructions."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Generation (and reward model) batch size."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed, and the seed of the judge's output-order randomisation."),
    system_prompt: str | None = typer.Option(None, "--system-prompt"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    engine: str = typer.Option("auto", "--engine", help="Generation engine: auto (vLLM when installed and a GPU is "
                                                        "present, else transformers) | transformers | vllm."),
    revisions: int = typer.Option(0, "--revisions", min=0, help="SRPO self-revision: revise each answer K times; the last revision is judged."),
    recipe: str | None = typer.Option(None, "--recipe", help="Take SRPO's prompt templates and the system prompt from this recipe (default: the recipe.yaml of the model's run directory)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="reward_model: a local model directory; openai: the served model name."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url", help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL, else https://api.openai.com/v1)."),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", "--judge-api-key-env", help="Environment variable holding the API key (unset: no key sent)."),
    judge_concurrency: int = typer.Option(4, "--judge-concurrency", min=1),
    judge_max_retries: int = typer.Option(5, "--judge-max-retries", min=0),
    judge_timeout: float = typer.Option(120.0, "--judge-timeout", help="Seconds per judge request."),
    judge_cache: Path | None = typer.Option(None, "--judge-cache", help="Verdict cache (default: OUTPUT_DIR/judge_cache.jsonl)."),
    difficulty: str | None = typer.Option(None, "--difficulty", help="CSV/JSON of instruction, instruction_difficulty for the LC GLM."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    raw: bool = typer.Option(False, "--raw", help="Send the instructions as plain text, without the chat template "
                                                  "(base models); as align generate --raw. Names the model NAME+raw."),
):
    """Generate answers, judge them against the reference, and write alpaca_eval files, metrics and a report."""
    if ctx.invoked_subcommand is not None:
        return
    from ..generation import SamplingSettings
    from .judges import JUDGES, JudgeSettings
    from .runner import EvalSettings, run_evaluation

    if model is None or instructions is None or judge is None:
        raise UserError("align eval needs --model, --instructions and --judge, e.g. align eval --model "
                        "builtin:smollm2-135m-instruct --instructions builtin:arithmetic_prompts --judge rule "
                        "(or align eval metrics ANNOTATIONS.json).")
    if judge not in JUDGES:
        raise UserError(f"Unknown judge '{judge}'; choose one of {', '.join(JUDGES)}.")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"Unknown dtype '{dtype}'; choose auto, float32, bfloat16 or float16.")
    judge_settings = JudgeSettings(
        kind=judge, model=judge_model, base_url=judge_base_url or os.environ.get("OPENAI_BASE_URL"),
        api_key_env=judge_api_key_env, seed=seed, concurrency=judge_concurrency, max_retries=judge_max_retries,
        timeout=judge_timeout, cache_path=judge_cache or output_dir / "judge_cache.jsonl", batch_size=batch_size)
    settings = EvalSettings(
        model=model, instructions=instructions, judge=judge_settings, output_dir=output_dir, reference=reference,
        name=name, limit=limit, system_prompt=system_prompt, revisions=revisions, recipe=recipe,
        difficulty=difficulty, dtype=dtype, engine=engine, raw=raw,
        sampling=SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  batch_size=batch_size))
    summary = run_evaluation(settings)
    _print_metrics(summary, as_json)
    if not as_json:
        typer.echo(f"\n{summary['name']} judged by {summary['annotator']}; files in {output_dir} "
                   f"(report: {summary['report']}).")


@eval_app.command("metrics")
def metrics(
    annotations: Path = typer.Argument(..., help="alpaca_eval annotations.json (instruction, output_1, output_2, preference)."),
    difficulty: str | None = typer.Option(None, "--difficulty", help="CSV/JSON of instruction, instruction_difficulty for the LC GLM."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Recompute the leaderboard metrics of an alpaca_eval annotations file."""
    from .formats import load_annotations, load_difficulty
    from .metrics import annotation_metrics

    rows = load_annotations(annotations)
    _print_metrics(annotation_metrics(rows, load_difficulty(difficulty) if difficulty else None), as_json)
