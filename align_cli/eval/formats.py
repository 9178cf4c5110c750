"""alpaca_eval's file formats: instruction sets, model outputs and annotations, read and written.

An instruction set (and a reference) is a JSON list or JSONL of `{instruction, output, generator,
dataset}`. The shipped verifiable sets (`builtin:NAME`, rows `{prompt: chat messages, answer}`) read
as the same rows, with the gold answer as `output` (generator `gold`) and `answer` kept for the
`rule` judge. Rows are joined on the exact instruction text.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import UserError

BUILTIN_PREFIX = "builtin:"
DEFAULT_BUILTIN_SPLIT = "test"  # evaluation reads held-out prompts unless told otherwise
ANNOTATION_FIELDS = ("instruction", "output_1", "generator_1", "output_2", "generator_2", "dataset", "annotator",
                     "preference", "raw_completion")


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSON list or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"File '{path}' does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise UserError(f"'{path}' is neither a JSON list nor JSON lines: {error}.") from None
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"'{path}' row {number} is not a JSON object; expected rows like "
                            f'{{"instruction": ..., "output": ...}}.')
    return rows


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a crash never leaves half a file for a resumed run to read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o666 & ~umask)  # mkstemp makes the file private; results are for sharing
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2, ensure_ascii=False)
        stream.write("\n")
    os.replace(staging, path)


def _last_user_message(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [message["content"] for message in prompt if message.get("role") == "user"]
    if not users:
        raise UserError("A shipped prompt has no user message.")
    return users[-1]


def _builtin_rows(source: str) -> list[dict]:
    from ..data.sources import load_source

    name, _, split = source[len(BUILTIN_PREFIX):].partition(":")
    rows = load_source(f"{BUILTIN_PREFIX}{name}", split=split or DEFAULT_BUILTIN_SPLIT)
    if "answer" not in rows.column_names or "prompt" not in rows.column_names:
        raise UserError(f"'{source}' is not an instruction set: it needs `prompt` and `answer` columns "
                        f"(use a prompts set such as builtin:arithmetic_prompts).")
    return [{"instruction": _last_user_message(row["prompt"]), "output": str(row["answer"]), "generator": "gold",
             "dataset": name, "answer": str(row["answer"])} for row in rows]


def load_instruction_set(source: str) -> list[dict]:
    """Rows with at least `instruction`, from `builtin:NAME[:SPLIT]` or a JSON/JSONL file."""
    rows = _builtin_rows(source) if source.startswith(BUILTIN_PREFIX) else read_records(source)
    seen: set[str] = set()
    for number, row in enumerate(rows):
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"'{source}' row {number} has no `instruction` text; rows must look like "
                            f'{{"instruction": ..., "output": ..., "generator": ..., "dataset": ...}}.')
        if instruction in seen:
            raise UserError(f"'{source}' has the instruction {_quote(instruction)} twice; instructions are the join "
                            f"key between model outputs and references, so they must be unique.")
        seen.add(instruction)
    return rows


def _quote(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def join_references(instructions: list[dict], references: list[dict], source: str) -> list[dict]:
    """For each instruction, its reference row (matched on the exact text); names any that are missing."""
    by_instruction = {row["instruction"]: row for row in references}
    missing = [row["instruction"] for row in instructions if row["instruction"] not in by_instruction]
    if missing:
        shown = "; ".join(_quote(text) for text in missing[:3])
        raise UserError(f"{len(missing)} of {len(instructions)} instructions have no reference output in '{source}' "
                        f"(matched on the exact instruction text), e.g. {shown}. Pass the reference file that "
                        f"belongs to this instruction set, or --limit to a matched subset.")
    joined = []
    for row in instructions:
        reference = by_instruction[row["instruction"]]
        if not isinstance(reference.get("output"), str):
            raise UserError(f"The reference for {_quote(row['instruction'])} in '{source}' has no `output` text.")
        joined.append(reference)
    return joined


def model_output_row(instruction_row: dict, output: str, generator: str, revisions: list[str] | None = None) -> dict:
    row = {"instruction": instruction_row["instruction"], "output": output, "generator": generator,
           "dataset": instruction_row.get("dataset", "")}
    if revisions is not None:
        row["revisions"] = revisions  # the first answer, then each revision; `output` is the last
    return row


def load_annotations(path: str | Path) -> list[dict]:
    """An alpaca_eval annotations file: rows with a `preference` (and the two outputs, for LC and lengths)."""
    rows = read_records(path)
    if not rows:
        raise UserError(f"'{path}' holds no annotations.")
    lacking = [number for number, row in enumerate(rows) if "preference" not in row]
    if lacking:
        raise UserError(f"'{path}' row {lacking[0]} has no `preference` ({len(lacking)} rows lack one); annotations "
                        f"need `instruction, output_1, output_2, preference` (1: output_1 wins, 2: output_2 wins).")
    for number, row in enumerate(rows):
        value = row["preference"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"'{path}' row {number}: `preference` must be a number or null, got {value!r}.")
    models = {row.get("generator_2") for row in rows}
    if len(models) > 1:
        raise UserError(f"'{path}' holds annotations of {len(models)} models (generator_2: "
                        f"{', '.join(sorted(map(str, models)))}); metrics are per model, so split the file.")
    return rows


def load_difficulty(path: str | Path) -> dict[str, float]:
    """Per-instruction difficulty for the LC GLM: CSV or JSON/JSONL rows `instruction, instruction_difficulty`."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import csv

        if not path.is_file():
            raise UserError(f"File '{path}' does not exist.")
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    else:
        rows = read_records(path)
    try:
        return {row["instruction"]: float(row["instruction_difficulty"]) for row in rows}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'{path}' must have columns `instruction` and `instruction_difficulty` (a number per "
                        f"instruction).") from None
