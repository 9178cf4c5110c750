"""The evaluated model's answers: generated through the shared engine, saved as alpaca_eval's
`model_outputs.json` after every batch, and resumed: instructions already answered by the same
generator are skipped.

Each instruction is asked as `align generate` asks a string prompt (`generation.instruction_prompt`): one
user message under the chat template, or the plain text with `raw`. Prompts go through SRPO's templates (`align_cli.srpo`), the same ones `align generate` and training
use: those of the model's run directory (its recipe.yaml) or of `--recipe`, else the defaults, which
leave the instruction unchanged. With `revisions` K > 0 each answer is revised K times (y_{k+1}
answers the revision prompt showing y_k); `output` is the last revision and `revisions` keeps the
whole chain, y_0 first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.render import Templates
from ..generation import SamplingSettings, instruction_prompt
from ..self_revision import self_revise
from .formats import model_output_row, read_records, write_json


def answered(path: Path, generator: str, revisions: int) -> dict[str, dict]:
    """Rows of an existing model_outputs.json that this generator finished, by instruction."""
    if not path.is_file():
        return {}
    done = {}
    for row in read_records(path):
        if row.get("generator") != generator or not isinstance(row.get("output"), str):
            continue
        if revisions and len(row.get("revisions") or []) != revisions + 1:
            continue
        done[row["instruction"]] = row
    return done


def generate_outputs(load_model: Callable, rows: list[dict], generator: str, path: Path, settings: SamplingSettings,
                     templates: Templates = Templates(), revisions: int = 0, raw: bool = False) -> tuple[list[dict], int]:
    """Model outputs for `rows` (in their order) and how many were generated now.

    `load_model()` returns the generation engine (`align_cli.engine`); it is called only if something is left
    to answer."""
    done = answered(path, generator, revisions)
    todo = [row for row in rows if row["instruction"] not in done]
    wanted = {row["instruction"] for row in rows}
    # rows of earlier runs on other instructions (a larger --limit) stay in the file
    kept = [row for row in (read_records(path) if path.is_file() else []) if row.get("instruction") not in wanted]
    if todo:
        engine = load_model()
        # Chunks of `save_every` rows (the batch size): a killed evaluation loses at most one chunk. vLLM batches
        # internally, so a larger chunk only changes how often the file is written.
        save_every = settings.batch_size if engine.name == "transformers" else max(settings.batch_size, 256)
        try:
            for start in range(0, len(todo), save_every):
                chunk = todo[start: start + save_every]
                prompts = [instruction_prompt(row["instruction"], raw) for row in chunk]
                for row, chain in zip(chunk, self_revise(engine, prompts, revisions, settings, templates)):
                    chain = [text.strip() for text in chain]
                    done[row["instruction"]] = model_output_row(row, chain[-1], generator, chain if revisions else None)
                write_json(path, [done[row["instruction"]] for row in rows if row["instruction"] in done] + kept)
        finally:
            engine.close()
    return [done[row["instruction"]] for row in rows], len(todo)
