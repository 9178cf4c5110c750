"""`align eval`: answer the instructions, judge each answer against the reference, score, report.

Layout of an evaluation directory (alpaca_eval's `results/` layout, several models side by side):
    D/leaderboard.csv, D/report.md, D/win_rates.png        every model evaluated into D
    D/judge_cache.jsonl                                     openai judge verdicts (reused by reruns)
    D/<model>/model_outputs.json                            the model's answers
    D/<model>/<judge>/annotations.json, metrics.json        the judgments and their metrics
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..generation import SamplingSettings
from ..self_revision import templates_for_model
from .answers import generate_outputs
from .formats import join_references, load_difficulty, load_instruction_set, write_json
from .judges import JudgeSettings, make_judge
from .metrics import annotation_metrics
from .report import update_leaderboard, write_report


@dataclass
class EvalSettings:
    model: str
    instructions: str
    judge: JudgeSettings
    output_dir: Path
    reference: str | None = None      # None: the instruction set's own `output` (alpaca_eval files, gold answers)
    name: str | None = None
    limit: int | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    system_prompt: str | None = None
    revisions: int = 0
    recipe: str | None = None         # SRPO templates and system prompt (default: the run directory's recipe)
    difficulty: str | None = None
    dtype: str = "auto"
    engine: str = "auto"              # generation engine: auto | transformers | vllm (align_cli.engine)
    raw: bool = False                 # instructions as plain text, without the chat template (generation.instruction_prompt)


def safe_name(text: str) -> str:
    """A directory name for a model or judge name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def resolve_model_dir(model: str) -> str:
    """A run directory of `align train` stands for its final_model/."""
    path = Path(model).expanduser()
    if (path / "final_model" / "config.json").is_file():
        return str(path / "final_model")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "summary.json").is_file():
        raise UserError(f"'{model}' is a run directory without final_model/: the run has not finished. Evaluate a "
                        f"checkpoint's model directory instead, or finish the run with align train --resume.")
    return model


def default_name(model: str, revisions: int, raw: bool = False) -> str:
    if model.startswith("builtin:"):
        base = model[len("builtin:"):]
    else:
        path = Path(model).expanduser()
        base = (path.parent.name if path.name == "final_model" else path.name) if path.exists() else model
    return base + (f"+revisions{revisions}" if revisions else "") + ("+raw" if raw else "")


def _engine_opener(model_location: str, dtype: str, engine: str, system_prompt: str | None, seed: int):
    def load():
        from ..config import ModelConfig
        from ..engine import open_engine
        from ..models import load_tokenizer, resolve_dtype

        config = ModelConfig(name=model_location, dtype=dtype)
        return open_engine(model_location, load_tokenizer(config), config, resolve_dtype(dtype), engine, system_prompt,
                           seed)
    return load


def _references(settings: EvalSettings, rows: list[dict]) -> list[dict]:
    if settings.reference is None:
        if not all(isinstance(row.get("output"), str) for row in rows):
            raise UserError(f"'{settings.instructions}' has no reference outputs (an `output` per row): pass "
                            f"--reference FILE with alpaca_eval rows {{instruction, output, generator}}.")
        return rows
    return join_references(rows, load_instruction_set(settings.reference), settings.reference)


def _pairs(rows: list[dict], references: list[dict], outputs: list[dict], name: str) -> list[dict]:
    pairs = []
    for row, reference, output in zip(rows, references, outputs):
        pair = {"instruction": row["instruction"], "output_1": reference["output"],
                "generator_1": reference.get("generator") or "reference", "output_2": output["output"],
                "generator_2": name, "dataset": row.get("dataset", "")}
        if row.get("answer") is not None:
            pair["answer"] = row["answer"]  # the verifiable solution, for the rule judge
        pairs.append(pair)
    return pairs


def _judge_extras(judge, judgments: list[dict]) -> dict:
    """What it cost and how verdicts were read: for the metrics file, never the credentials."""
    extras: dict = {}
    if hasattr(judge, "requests_made"):
        raw = [j["raw_completion"] for j in judgments]
        extras.update(judge_requests=judge.requests_made, judge_cache_hits=sum(bool(r.get("from_cache")) for r in raw),
                      verdicts_from_logprobs=sum(r.get("parsed_from") == "logprobs" for r in raw),
                      verdicts_unparsed=sum(j["preference"] is None for j in judgments))
    if judge.name == "rule":
        raw = [j["raw_completion"] for j in judgments]
        extras.update(model_accuracy=sum(r["model_correct"] for r in raw) / len(raw),
                      reference_accuracy=sum(r["reference_correct"] for r in raw) / len(raw))
    return extras


def run_evaluation(settings: EvalSettings) -> dict:
    rows = load_instruction_set(settings.instructions)
    if settings.limit is not None:
        rows = rows[: settings.limit]
    if not rows:
        raise UserError(f"'{settings.instructions}' has no instructions to evaluate.")
    references = _references(settings, rows)
    difficulty = load_difficulty(settings.difficulty) if settings.difficulty else None
    judge = make_judge(settings.judge)  # before generating: a bad judge option fails in seconds, not after hours
    if hasattr(judge, "check"):
        judge.check(rows)

    model_location = resolve_model_dir(settings.model)
    name = settings.name or default_name(model_location, settings.revisions, settings.raw)
    model_dir = settings.output_dir / safe_name(name)
    templates, recipe_system_prompt, _ = templates_for_model(model_location, settings.recipe)
    opener = _engine_opener(model_location, settings.dtype, settings.engine,
                            settings.system_prompt or recipe_system_prompt, settings.sampling.seed)
    outputs, generated = generate_outputs(opener, rows, name, model_dir / "model_outputs.json", settings.sampling,
                                          templates, settings.revisions, settings.raw)

    pairs = _pairs(rows, references, outputs, name)
    judgments = judge.judge(pairs)
    annotations = [{**pair, "annotator": judge.name, **judgment} for pair, judgment in zip(pairs, judgments)]
    judge_dir = model_dir / safe_name(judge.name)
    write_json(judge_dir / "annotations.json", annotations)

    metrics = annotation_metrics(annotations, difficulty)
    reference_name = references[0].get("generator") or "reference"
    summary = {"name": name, "annotator": judge.name, "reference": reference_name, **metrics,
               "instructions": settings.instructions, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "generated_now": generated, **_judge_extras(judge, judgments)}
    if hasattr(judge, "endpoint"):
        from .judges.openai_judge import public_url

        summary["judge_endpoint"] = public_url(judge.endpoint)
    write_json(judge_dir / "metrics.json", summary)
    leaderboard = update_leaderboard(settings.output_dir / "leaderboard.csv", summary)
    summary["report"] = str(write_report(settings.output_dir, leaderboard))
    return summary
