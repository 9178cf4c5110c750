"""`align plot`: logged metrics of one or more runs as a PNG, runs overlaid (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .run_log import read_metrics


def metric_series(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in a run's metrics.jsonl. `split/name` picks a split (`eval/task_accuracy`);
    a bare name is read from the `train` records."""
    split, _, name = metric.rpartition("/") if metric.startswith(("train/", "eval/")) else ("train", "", metric)
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    points = [(r["step"], r[name]) for r in records
              if r.get("split") == split and isinstance(r.get(name), (int, float))]
    points = sorted(dict(points).items())  # a resumed run may log a step twice: keep the last
    return [s for s, _ in points], [float(v) for _, v in points]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out = []
    for index in range(len(values)):
        part = values[max(0, index - window + 1): index + 1]
        out.append(sum(part) / len(part))
    return out


def plot_runs(run_dirs: list[str], metrics: list[str], output: str, labels: list[str] | None = None,
              smooth: int = 1, title: str | None = None) -> Path:
    """One panel per metric, one line per run; a run missing a metric is skipped in that panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("align plot needs matplotlib: pip install 'align[eval]' (or pip install matplotlib).") from None
    if labels and len(labels) != len(run_dirs):
        raise UserError(f"--label was given {len(labels)} times for {len(run_dirs)} runs; give one per run or none.")
    for run_dir in run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").exists():
            raise UserError(f"'{run_dir}' has no metrics.jsonl: point align plot at run directories.")
    names = labels or [Path(d).name for d in run_dirs]
    figure, axes = plt.subplots(len(metrics), 1, figsize=(7, 3.2 * len(metrics)), squeeze=False)
    found_any = False
    for axis, metric in zip(axes[:, 0], metrics):
        for run_dir, name in zip(run_dirs, names):
            steps, values = metric_series(Path(run_dir), metric)
            if steps:
                found_any = True
                suffix = f" ({smooth}-step running mean)" if smooth > 1 else ""
                axis.plot(steps, _smooth(values, smooth), marker="o" if len(steps) < 30 else None,
                          markersize=3, label=name + suffix)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=8)
    if not found_any:
        plt.close(figure)
        raise UserError(f"None of the runs logged {', '.join(metrics)}. Metric names are the keys of metrics.jsonl "
                        f"(e.g. reward/mean, loss; eval/task_accuracy for evaluation records).")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output_path = Path(output)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=110)
    plt.close(figure)
    return output_path
