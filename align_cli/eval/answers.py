"""The evaluated model's answers: generated through the shared engine, saved as alpaca_eval's
`model_outputs.json` after every batch, and resumed: instructions already answered by the same
generator are skipped.

With `revisions` K > 0 (SRPO's self-improvement at inference), each answer is revised K times: the
model sees the instruction and its previous answer through a revision template and writes a new
one. `output` is the last revision; `revisions` keeps the whole chain, first answer first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..generation import SamplingSettings, generate
from .formats import model_output_row, read_records
from .prompts import REVISION_TEMPLATE


def resolve_revision_template(template: str | None) -> str:
    """The template text (a file's contents when it names a file); it must use both placeholders."""
    if template is None:
        return REVISION_TEMPLATE
    path = Path(template)
    text = path.read_text(encoding="utf-8") if len(template) < 4096 and path.is_file() else template
    for placeholder in ("{instruction}", "{previous}"):
        if placeholder not in text:
            raise UserError(f"The revision template must contain {placeholder} (it has {{instruction}} for the "
                            f"request and {{previous}} for the answer to improve).")
    return text


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


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _answer_batch(model, tokenizer, instructions: list[str], settings: SamplingSettings, system_prompt: str | None,
                  revisions: int, template: str) -> list[list[str]]:
    """Each instruction's chain of answers: the first, then `revisions` revisions."""
    first = generate(model, tokenizer, [_user(text) for text in instructions], settings, system_prompt)
    chains = [[samples[0].strip()] for samples in first]
    for _ in range(revisions):
        prompts = [_user(template.format(instruction=text, previous=chain[-1]))
                   for text, chain in zip(instructions, chains)]
        revised = generate(model, tokenizer, prompts, settings, system_prompt)
        for chain, samples in zip(chains, revised):
            chain.append(samples[0].strip())
    return chains


def generate_outputs(load_model: Callable, rows: list[dict], generator: str, path: Path, settings: SamplingSettings,
                     system_prompt: str | None = None, revisions: int = 0, revision_template: str | None = None,
                     save: Callable[[Path, list], None] | None = None) -> tuple[list[dict], int]:
    """Model outputs for `rows` (in their order) and how many were generated now.

    `load_model()` returns (model, tokenizer); it is called only if something is left to answer."""
    from .formats import write_json

    save = save or write_json
    template = resolve_revision_template(revision_template) if revisions else REVISION_TEMPLATE
    done = answered(path, generator, revisions)
    todo = [row for row in rows if row["instruction"] not in done]
    wanted = {row["instruction"] for row in rows}
    # rows of earlier runs on other instructions (a larger --limit) stay in the file
    kept = [row for row in (read_records(path) if path.is_file() else []) if row.get("instruction") not in wanted]
    if todo:
        model, tokenizer = load_model()
        for start in range(0, len(todo), settings.batch_size):
            chunk = todo[start: start + settings.batch_size]
            chains = _answer_batch(model, tokenizer, [row["instruction"] for row in chunk], settings, system_prompt,
                                   revisions, template)
            for row, chain in zip(chunk, chains):
                done[row["instruction"]] = model_output_row(row, chain[-1], generator, chain if revisions else None)
            save(path, [done[row["instruction"]] for row in rows if row["instruction"] in done] + kept)
    return [done[row["instruction"]] for row in rows], len(todo)
