"""Checking preference rows before tokenisation: missing or mistyped fields, implicit prompts, unusable pairs.

Every problem names the data source, the row (the line, for JSON-lines files) and the key. Rows without a
prompt get one only where it can be found without guessing:

- chat conversations (lists of messages): the shared leading messages (`trl.data_utils.extract_prompt`);
- text with a recognised turn marker (`TURN_MARKERS`): everything up to and including the last marker of the
  chosen text, as TRL's Anthropic HH conversion does (`prompt = text[:rfind("\\n\\nAssistant:") + 13]`).

Plain text without a marker has no recoverable prompt: the longest common character prefix of two answers
is the words they happen to share ("The answer is"), not the question. Such data needs a prompt column.

Rows whose chosen answer is empty, or whose chosen and rejected answers are identical, teach nothing (or
only noise): they are dropped and counted in a warning; if no row is left the run stops.
"""

from __future__ import annotations

import warnings

from ..errors import UserError
from .sources import row_location

# Turn markers of raw-text conversations, in the order they are tried; the prompt ends after the last one.
TURN_MARKERS = {
    "\n\nAssistant:": "Anthropic HH-RLHF",
    "<|im_start|>assistant\n": "ChatML",
    "<|start_header_id|>assistant<|end_header_id|>\n\n": "Llama 3",
    "[/INST]": "Llama 2 / Mistral",
}


class RowError(ValueError):
    """A row that cannot be read as a preference pair; `key` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check_value(key: str, value) -> None:
    if value is None:
        raise RowError(key, f"has no '{key}' (the key is missing or null)")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise RowError(key, f"'{key}' is a {type(value).__name__}; it must be a string or a list of chat messages "
                            f"({{role, content}})")


def split_at_turn_marker(chosen: str, rejected: str) -> dict:
    """`{prompt, chosen, rejected}` from two raw-text conversations, split after the chosen text's last turn
    marker; the rejected text must continue the same prompt. Raises `RowError` when no marker is found."""
    for marker, style in TURN_MARKERS.items():
        cut = chosen.rfind(marker)
        if cut < 0:
            continue
        prompt = chosen[:cut + len(marker)]
        if not rejected.startswith(prompt):
            raise RowError("rejected", f"'rejected' does not continue the conversation of 'chosen' up to its last "
                                       f"{style} turn marker {marker!r}; both must share the prompt")
        return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}
    raise RowError("prompt", "has no prompt, and its text has no recognised turn marker ("
                             + ", ".join(repr(m) for m in TURN_MARKERS) + ") to split one off")


def complete_prompt(row: dict) -> dict:
    """The row with an explicit prompt: as given, or recovered from the conversation (see the module doc)."""
    if row.get("prompt") is not None:
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return {**row, **split_at_turn_marker(chosen, rejected)}
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise RowError("rejected", "'chosen' and 'rejected' must both be text or both be chat messages")
    from trl.data_utils import extract_prompt

    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        raise RowError("prompt", "has no prompt, and 'chosen' and 'rejected' share no leading messages")
    return {**row, **split}


def checked_row(row: dict) -> dict:
    """Type checks, then the explicit prompt (`complete_prompt`)."""
    for key in ("chosen", "rejected"):
        _check_value(key, row.get(key))
    if row.get("prompt") is not None:
        _check_value("prompt", row["prompt"])
        if isinstance(row["prompt"], str) != isinstance(row["chosen"], str) or (
                isinstance(row["chosen"], str) != isinstance(row["rejected"], str)):
            raise RowError("chosen", "'prompt', 'chosen' and 'rejected' must all be text or all be chat messages")
    return complete_prompt(row)


def is_empty_answer(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not any(str(message.get("content") or "").strip() for message in answer)


# Bump when the checks change: `datasets` fingerprints `_check_and_flag` by its own code, not by its helpers'.
CHECKS_VERSION = 1


def _check_and_flag(row: dict, index: int, source: str, version: int = CHECKS_VERSION) -> dict:
    try:
        completed = checked_row(row)
    except RowError as error:
        hint = ("Set data.train.columns.prompt (or data.eval.columns.prompt) to the column that holds the prompt."
                if error.key == "prompt" else f"Fix or remove that row (key '{error.key}').")
        raise UserError(f"Dataset '{source}', {row_location(source, index)}: the row {error} {hint}") from None
    return {**completed,
            "empty_chosen": is_empty_answer(completed["chosen"]),
            "identical_pair": completed["chosen"] == completed["rejected"]}


def check_preference_rows(dataset, source: str):
    """Check every row (`checked_row`), fill in implicit prompts, drop empty-chosen and identical pairs with a
    counted warning; `source` names the data in messages (and locates lines in local JSON-lines files)."""
    flagged = dataset.map(_check_and_flag, with_indices=True, fn_kwargs={"source": source, "version": CHECKS_VERSION}, desc="Checking rows")
    empty_flags, identical_flags = flagged["empty_chosen"], flagged["identical_pair"]
    empty = sum(empty_flags)
    identical = sum(same and not blank for blank, same in zip(empty_flags, identical_flags))
    if empty + identical == len(flagged):
        raise UserError(f"Dataset '{source}': no usable preference pair among its {len(flagged)} rows ({empty} with "
                        f"an empty chosen answer, {identical} with chosen identical to rejected). Check the "
                        f"data.*.columns mapping: chosen and rejected must name two different answers.")
    if empty or identical:
        warnings.warn(f"Dataset '{source}': dropped {empty + identical} of {len(flagged)} rows: {empty} with an empty "
                      f"chosen answer, {identical} whose chosen answer equals the rejected one.", stacklevel=2)
        flagged = flagged.filter(lambda blank, same: not (blank or same),
                                 input_columns=["empty_chosen", "identical_pair"])
    return flagged.remove_columns(["empty_chosen", "identical_pair"])
