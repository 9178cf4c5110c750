"""Tables over seeds from the run directories that `benchmarks/iterative_seeds.sh` writes.

Every run directory is named `<label>_seed<N>` and holds the run's `summary.json` (and, for online RL,
`metrics.jsonl`). Three tables:

- iterative runs (APO, Curry-DPO): held-out task accuracy at every iteration / stage, per label: the mean
  over seeds, a 95% t-interval (Student t with n-1 degrees of freedom, mean +- t * s / sqrt(n), s the
  sample standard deviation over seeds) and the per-seed values;
- `--pair A:B`: the per-seed difference A - B at every iteration both have, with its own t-interval
  (paired by seed: APO and iterative DPO of one seed share iteration 1's samples exactly);
- online RL runs (GRPO, D^3S, HAPO): sampled reward of the first and the last five steps, the held-out
  accuracy after training and the completion tokens that carried gradient.

    python benchmarks/aggregate_seeds.py RUNS_DIR --pair apo:iterative_dpo --pair curry_dpo:single_pair
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<label>.+)_seed(?P<seed>-?\d+)$")


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the two-sided Student-t interval over the values; half-width NaN for n < 2."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    from scipy.stats import t

    quantile = t.ppf(0.5 + confidence / 2, len(values) - 1)
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


STEP_FOLDER = re.compile(r"^(iteration|stage)-(\d+)$")


def read_runs(root: Path) -> dict[str, dict[int, Path]]:
    """{label: {seed: run directory}} for every `<label>_seed<N>` directory holding a summary.json or, for a
    run of APO or Curry-DPO that stopped early, the evaluation of its starting model."""
    runs: dict[str, dict[int, Path]] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        match = RUN_NAME.match(folder.name)
        if match and ((folder / "summary.json").exists() or is_iterative(folder)):
            runs.setdefault(match["label"], {})[int(match["seed"])] = folder
    return runs


SUMMARY_ROWS = {"apo": "iteration", "curry_dpo": "stage"}  # method -> the summary's rows (`iterations`, `stages`)


def summary_of(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def is_iterative(run_dir: Path) -> bool:
    return summary_of(run_dir).get("method") in SUMMARY_ROWS or any(
        (run_dir / f"{name}-0" / "evaluation.json").exists() for name in SUMMARY_ROWS.values())


def accuracy_by_step(run_dir: Path) -> dict[int, float]:
    """{iteration or stage: held-out task accuracy} of an APO or Curry-DPO run (0: the starting model), read
    from each iteration's or stage's evaluation.json, so a run that stopped early gives the steps it finished."""
    accuracies = {}
    for evaluation in run_dir.glob("*/evaluation.json"):
        match = STEP_FOLDER.match(evaluation.parent.name)
        value = json.loads(evaluation.read_text()).get("task_accuracy") if match else None
        if value is not None:
            accuracies[int(match[2])] = value
    if not accuracies:  # a run directory kept with its summary.json only (docs/iterative_runs/)
        summary = summary_of(run_dir)
        name = SUMMARY_ROWS[summary["method"]]
        accuracies = {row[name]: row["task_accuracy"] for row in summary[name + "s"]
                      if row.get("task_accuracy") is not None}
    return dict(sorted(accuracies.items()))


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def format_interval(values: list[float]) -> str:
    mean, half = t_interval(values)
    if math.isnan(half):
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def iterative_table(runs: dict[str, dict[int, Path]]) -> list[str]:
    lines = ["| run | step | n seeds | mean [95% t-interval] | per seed |", "|---|---|---|---|---|"]
    for label, seeds in runs.items():
        per_seed = {seed: accuracy_by_step(path) for seed, path in sorted(seeds.items())}
        steps = sorted({step for accuracies in per_seed.values() for step in accuracies})
        for step in steps:
            values = {seed: acc[step] for seed, acc in per_seed.items() if step in acc}
            shown = " ".join(f"{seed}:{value:.2f}" + ("" if finished(seeds[seed]) else "*")
                             for seed, value in values.items())
            lines.append(f"| {label} | {step} | {len(values)} | {format_interval(list(values.values()))} | {shown} |")
    return lines


def paired_table(runs: dict[str, dict[int, Path]], pairs: list[tuple[str, str]]) -> list[str]:
    lines = ["| difference | step | n seeds | mean [95% t-interval] | per seed |", "|---|---|---|---|---|"]
    for first, second in pairs:
        if first not in runs or second not in runs:
            lines.append(f"| {first} - {second} | - | 0 | missing runs | |")
            continue
        seeds = sorted(set(runs[first]) & set(runs[second]))
        left = {seed: accuracy_by_step(runs[first][seed]) for seed in seeds}
        right = {seed: accuracy_by_step(runs[second][seed]) for seed in seeds}
        steps = sorted({step for seed in seeds for step in left[seed] if step in right[seed]})
        for step in steps:
            diffs = {seed: left[seed][step] - right[seed][step] for seed in seeds
                     if step in left[seed] and step in right[seed]}
            shown = " ".join(f"{seed}:{value:+.2f}" for seed, value in diffs.items())
            lines.append(f"| {first} - {second} | {step} | {len(diffs)} | {format_interval(list(diffs.values()))} "
                         f"| {shown} |")
    return lines


def online_rl_row(run_dir: Path) -> dict:
    """First-five and last-five mean sampled reward, held-out accuracy, tokens with gradient of one run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = sorted((row for row in rows if row.get("split") == "train"), key=lambda row: row["step"])
    rewards = [row["reward/mean"] for row in train]
    summary = json.loads((run_dir / "summary.json").read_text())
    factors = [row["hapo/temperature_factor"] for row in train if "hapo/temperature_factor" in row]
    return {"steps": len(train), "first5": statistics.fmean(rewards[:5]), "last5": statistics.fmean(rewards[-5:]),
            "before": summary["before"]["task_accuracy"], "after": summary["after"]["task_accuracy"],
            "gradient_tokens": sum(row.get("loss_tokens", 0.0) for row in train),
            "completion_tokens": summary["completion_tokens"],
            "temperature_factor": statistics.fmean(factors) if factors else None}


def online_rl_table(runs: dict[str, dict[int, Path]]) -> list[str]:
    lines = ["| run | seed | steps | reward first 5 -> last 5 | held-out accuracy before -> after | "
             "completion tokens with gradient | mean HAPO temperature factor |", "|---|---|---|---|---|---|---|"]
    for label, seeds in runs.items():
        rows = {seed: online_rl_row(path) for seed, path in sorted(seeds.items())}
        for seed, row in rows.items():
            factor = f"{row['temperature_factor']:.3f}" if row["temperature_factor"] is not None else "-"
            share = row["gradient_tokens"] / max(row["completion_tokens"], 1)
            lines.append(f"| {label} | {seed} | {row['steps']} | {row['first5']:.2f} -> {row['last5']:.2f} | "
                         f"{row['before']:.2f} -> {row['after']:.2f} | {row['gradient_tokens']:.0f} of "
                         f"{row['completion_tokens']} ({share:.0%}) | {factor} |")
        if len(rows) > 1:
            column = lambda key: [row[key] for row in rows.values()]  # noqa: E731
            lines.append(f"| {label} | mean [95% t] | | {format_interval(column('first5'))} -> "
                         f"{format_interval(column('last5'))} | -> {format_interval(column('after'))} | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="folder of <label>_seed<N> run directories")
    parser.add_argument("--pair", action="append", default=[], metavar="A:B",
                        help="also print the per-seed difference A - B (labels) at every step")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs_dir)
    if not runs:
        print(f"No <label>_seed<N>/summary.json under {args.runs_dir}.", file=sys.stderr)
        return 2
    iterative = {label: seeds for label, seeds in runs.items() if is_iterative(next(iter(seeds.values())))}
    online = {label: seeds for label, seeds in runs.items() if label not in iterative}
    pairs = [tuple(spec.split(":", 1)) for spec in args.pair]
    if iterative:
        print("Held-out task accuracy (strict, greedy) per iteration / stage; 95% t-interval over seeds:\n")
        print("\n".join(iterative_table(iterative)))
        print("\n(*: the run stopped before its summary.json; its log says why)")
    if pairs:
        print("\nPaired by seed, difference of held-out task accuracy:\n")
        print("\n".join(paired_table(iterative, pairs)))
    if online:
        print("\nOnline RL:\n")
        print("\n".join(online_rl_table(online)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
