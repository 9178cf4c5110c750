"""The evaluation directory's shared files: `leaderboard.csv` (one row per model, judge and reference,
kept across runs), `report.md` and `win_rates.png` (win rate with standard-error bars for every row)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ["name", "annotator", "reference", "length_controlled_winrate", "lc_standard_error", "win_rate",
           "standard_error", "discrete_win_rate", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length",
           "instructions", "evaluated_at"]
_ROW_KEY = ("name", "annotator", "reference")


def read_leaderboard(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def update_leaderboard(path: Path, row: dict) -> list[dict]:
    """Add `row`, replacing an earlier row of the same model, judge and reference (a rerun)."""
    rows = [old for old in read_leaderboard(path) if tuple(old.get(k) for k in _ROW_KEY) != tuple(str(row[k]) for k in _ROW_KEY)]
    rows.append({column: "" if row.get(column) is None else row.get(column) for column in COLUMNS})
    staging = path.with_suffix(".csv.tmp")
    with staging.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)
    return rows


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _cell(value, digits: int = 1) -> str:
    number = _number(value)
    return "-" if math.isnan(number) else f"{number:.{digits}f}"


def plot_win_rates(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    labels = [f"{row['name']}\n{row['annotator']} vs {row['reference']}" for row in rows]
    rates = [_number(row["win_rate"]) for row in rows]
    errors = [0.0 if math.isnan(_number(row["standard_error"])) else _number(row["standard_error"]) for row in rows]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 4.2))
    positions = range(len(rows))
    axes.bar(positions, rates, yerr=errors, capsize=6, color="#4C72B0", label="win rate (± standard error)")
    lc = [_number(row["length_controlled_winrate"]) for row in rows]
    if any(not math.isnan(value) for value in lc):
        axes.scatter(positions, lc, color="#DD8452", zorder=3, label="length-controlled win rate")
    axes.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.set_ylim(0, 100)
    axes.set_ylabel("win rate against the reference (%)")
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(directory: Path, rows: list[dict]) -> Path:
    """report.md (a table of every row, best win rate first) and the plot next to it."""
    ordered = sorted(rows, key=lambda row: -_number(row["win_rate"]) if not math.isnan(_number(row["win_rate"])) else math.inf)
    plot_win_rates(ordered, directory / "win_rates.png")
    lines = ["# Evaluation report", "",
             "Win rates against the reference output, judged pairwise (alpaca_eval's metrics; 50% = on par).", "",
             "| model | judge | reference | win rate | ± s.e. | LC win rate | ± s.e. | discrete | wins / losses / draws | n | avg length |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ordered:
        lines.append(f"| {row['name']} | {row['annotator']} | {row['reference']} | {_cell(row['win_rate'])} | "
                     f"{_cell(row['standard_error'])} | {_cell(row['length_controlled_winrate'])} | "
                     f"{_cell(row['lc_standard_error'])} | {_cell(row['discrete_win_rate'])} | "
                     f"{row['n_wins']} / {row['n_wins_base']} / {row['n_draws']} | {row['n_total']} | {row['avg_length']} |")
    lines += ["", "![win rates](win_rates.png)", "",
              "LC: alpaca_eval's length-controlled GLM fitted on these annotations; without a difficulty file its "
              "standard error is 0 by construction (see docs/eval.md).", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
