"""The `align` command line: train, validate, recipes, env (eval and generate join later).

Exit codes: 0 success; 2 bad input (one paragraph, no traceback); 1 internal failure (traceback);
130/143 interrupted by SIGINT/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(help="align: preference alignment for LLMs from YAML recipes.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
recipes_app = typer.Typer(help="List the shipped recipes, or print one (or the schema of every key).",
                          invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe file (or the name of a shipped recipe)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set training.learning_rate=1e-6 (repeatable)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (default: output.dir of the recipe)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output directory from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished or partial run in the output directory."),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="With --resume: accept a recipe that differs from the run's recipe.yaml in "
                                             "keys that change the training (refused otherwise; logging.*, output.*, "
                                             "checkpointing.every/keep_last, evaluation.batch_size, data.num_proc, training.compile and, "
                                             "with a constant schedule, training.max_steps may always change)."),
    accelerate_config: Optional[str] = typer.Option(
        None, "--accelerate-config", help="Relaunch through `accelerate launch` with this config: a shipped one (ddp, fsdp2, "
                                          "zero2, zero3, zero3_offload, multi_node; recipes/accelerate/) or a file."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", min=1,
                                                help="With --accelerate-config: processes (GPUs) in all."),
):
    """Train a model as the recipe says."""
    import json

    from .lifecycle import Interrupted
    from .methods import METHODS
    from .recipe import load_recipe

    loaded, path = load_recipe(recipe, set_)
    if accelerate_config:  # validated above; now the same command once per process
        from .distributed import relaunch

        argv = ["train", recipe, *[part for item in set_ for part in ("--set", item)],
                *(["--output-dir", output_dir] if output_dir else []), *(["--resume"] if resume else []),
                *(["--overwrite"] if overwrite else []), *(["--allow-recipe-change"] if allow_recipe_change else [])]
        raise typer.Exit(relaunch(accelerate_config, num_processes, argv))
    try:
        summary = METHODS[loaded.method.name].run(loaded, path, output_dir, resume, overwrite, allow_recipe_change=allow_recipe_change)
    except Interrupted as stop:
        from .distributed import launch_options_to_resume

        resume_with = ["align", "train", recipe, *[part for item in set_ for part in ("--set", item)], "--resume",
                       *(["--output-dir", output_dir] if output_dir else []), *launch_options_to_resume()]
        _echo_err(f"Interrupted at step {stop.step}; checkpoint saved in {stop.checkpoint}. "
                  f"Continue with: {shlex.join(resume_with)}")
        raise typer.Exit(128 + stop.signal_number) from None
    before, after = summary["before"], summary["after"]
    shown = ["loss", "rewards/accuracies", "likelihood_accuracy", "task_accuracy"]
    typer.echo(json.dumps({"run_dir": str(Path(summary["final_model_dir"] or ".").parent),
                           "before": {k: before.get(k) for k in shown if k in before},
                           "after": {k: after.get(k) for k in shown if k in after},
                           "tokens_per_second": summary["tokens_per_second"]}, indent=2))


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Recipe file (or the name of a shipped recipe)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key (as for train)."),
):
    """Check a recipe (keys, types, losses and their hyperparameters) without training."""
    from .recipe import load_recipe

    loaded, path = load_recipe(recipe, set_)
    losses = ", ".join(f"{t.weight} x {t.name}{t.params or ''}" for t in loaded.method.losses)
    typer.echo(f"{path}: valid. method {loaded.method.name}; losses {losses}; model {loaded.model.name}; "
               f"data {loaded.data.train.source}.")


@recipes_app.callback()
def recipes_list(ctx: typer.Context):
    """List the shipped recipes."""
    if ctx.invoked_subcommand is not None:
        return
    from .recipe import builtin_recipes

    for name, path in sorted(builtin_recipes().items()):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        typer.echo(f"{name:18s} {first}")


@recipes_app.command("show")
def recipes_show(
    name: Optional[str] = typer.Argument(None, help="A shipped recipe name or a recipe file."),
    schema: bool = typer.Option(False, "--schema", help="Print every recipe key with its type, default and meaning."),
):
    """Print a recipe, or the schema of every key."""
    from .recipe import resolve_recipe_path, schema_text

    if schema:
        typer.echo(schema_text())
        return
    if name is None:
        raise UserError("Name a recipe (align recipes show dpo) or pass --schema.")
    typer.echo(resolve_recipe_path(name).read_text())


@app.command()
def env():
    """Versions, devices and which optional engines are available."""
    from .envinfo import environment_report

    for key, value in environment_report().items():
        typer.echo(f"{key:22s} {value}")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="A run directory of align train (its final_model), a model "
                                                   "directory, builtin:NAME or a hub id."),
    prompts: str = typer.Option(..., "--prompts", help="builtin:NAME or a .jsonl/.json/.parquet/.csv file with a `prompt` "
                                                       "column (string or chat messages); an `answer` column is checked."),
    output: str = typer.Option(..., "--output", help="JSONL file: one line per prompt with every revision y_0..y_K."),
    revisions: int = typer.Option(0, "--revisions", min=0, help="Self-revisions K: y_{k+1} answers the revision prompt showing y_k."),
    split: str = typer.Option("test", "--split", help="Split of --prompts."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", min=1, help="Use only the first N prompts."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Generation budget per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Of y_0 (and of the revisions unless "
                                                                           "--revision-temperature is given). 0: greedy."),
    revision_temperature: Optional[float] = typer.Option(None, "--revision-temperature", min=0.0,
                                                         help="Of y_1..y_K (default: --temperature). E.g. sampled "
                                                              "drafts revised greedily: --temperature 1 --revision-temperature 0."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generation batch."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the SRPO templates and system prompt from this recipe "
                                                                "(default: the recipe.yaml of the model's run directory)."),
    engine: str = typer.Option("auto", "--engine", help="auto (vLLM when installed and a GPU is present, else "
                                                        "transformers) | transformers | vllm."),
    raw: bool = typer.Option(False, "--raw", help="Send string prompts as plain text, without the chat template "
                                                  "(base models, prompts already formatted); as align eval --raw."),
):
    """Answer prompts with a model, optionally revising each answer K times (SRPO self-revision)."""
    import json
    from dataclasses import replace

    from .generate_cli import generate_to_file
    from .generation import SamplingSettings

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                batch_size=batch_size)
    revision_settings = None if revision_temperature is None else replace(settings, temperature=revision_temperature)
    summary = generate_to_file(model, prompts, split, output, revisions, settings, num_prompts, recipe, engine,
                               revision_settings, raw)
    typer.echo(json.dumps(summary, indent=2))


# `align eval` (and `align eval metrics`) is a sub-app of its own package.
from .eval.cli import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")


@app.command()
def plot(
    run_dirs: List[str] = typer.Argument(..., help="Run directories (each with a metrics.jsonl)."),
    metric: List[str] = typer.Option(..., "--metric", help="A logged metric (reward/mean, loss, eval/task_accuracy, ...); "
                                                           "repeat for several panels."),
    output: str = typer.Option(..., "--output", help="PNG file to write."),
    label: List[str] = typer.Option([], "--label", help="Legend name of each run, in order (default: directory names)."),
    smooth: int = typer.Option(1, "--smooth", min=1, help="Running mean over this many logged steps."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
):
    """Plot logged metrics of one or more runs into a PNG, runs overlaid."""
    from .plotting import plot_runs

    typer.echo(str(plot_runs(run_dirs, metric, output, label or None, smooth, title)))


def main() -> None:
    code = exit_code_of_command()
    from .distributed import report_exit_code

    report_exit_code(code)  # for `--accelerate-config`: the relaunching process exits with its workers' code
    sys.exit(code)


def exit_code_of_command() -> int:
    """Run the command line and return its exit code: 0, 2 (a user's mistake, one line), 1 (internal, traceback),
    130/143 (SIGINT/SIGTERM). Under `standalone_mode=False` typer returns the code of `typer.Exit` (and turns
    KeyboardInterrupt into 130) instead of raising it, so the return value is the code."""
    try:
        returned = app(standalone_mode=False)
    except UserError as error:
        _echo_err(f"error: {error}")
        return 2
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _echo_err("Aborted.")
        return 130
    except _click_exceptions() as error:  # a usage error: bad option, missing or extra argument, value out of range
        _echo_err(usage_error_line(error))
        return 2
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1
    return returned if isinstance(returned, int) else 0


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """click's exception base as typer raises it: typer >= 0.22 vendors click (`typer._click`), older typers
    raise click's own."""
    classes = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def usage_error_line(error) -> str:
    """One line: click's message and the command's usage, e.g. `error: No such option: --bogus (usage: align
    train [OPTIONS] RECIPE; align train --help lists every option).`"""
    message = " ".join(error.format_message().split()).rstrip(".")
    context = getattr(error, "ctx", None)
    if context is None:
        return f"error: {message}"
    usage = " ".join(context.get_usage().split()).removeprefix("Usage: ")
    return f"error: {message} (usage: {usage}; {context.command_path} --help lists every option)."


if __name__ == "__main__":
    main()
