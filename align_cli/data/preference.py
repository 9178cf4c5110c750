"""Preference rows -> tokenised, masked examples.

Accepted row formats (after the recipe's column mapping):
- explicit prompt: `prompt`, `chosen`, `rejected`, each a string (standard format: used as raw
  text, no chat template) or a list of chat messages (conversational: rendered with the chat template);
- implicit prompt: only `chosen` and `rejected`, full chat conversations sharing their leading messages,
  or raw text with a turn marker such as Anthropic HH's "\n\nAssistant:" (data/rows.py, which also checks
  every row and drops empty-chosen and identical pairs). Plain text without a prompt column is an error.

Tokenisation follows TRL 1.16: each completion is tokenised together with its prompt, and the completion
starts at the first token where prompt + completion and the prompt alone differ. Tokenising them apart
would split tokens that merge across the boundary (a prompt "Answer: " ends in a lone space token that
normal tokenisation of "Answer: 4" never produces). When the boundary moves into the prompt, the rows are
counted (`prompt_boundary_moved`) and reported in a warning.

Truncation policy (`data.max_length`, `data.max_prompt_length`, `data.prompt_truncation`):
1. A prompt longer than `max_prompt_length` tokens is dropped from training (`drop`, the default:
   cutting a prompt silently changes the task) or keeps its last `max_prompt_length` tokens (`keep_end`).
2. A completion is cut on the right so that prompt + completion fits in `max_length`.
Both are counted and reported as a warning. If no row survives, the run stops with an error.

Extra sequences, tokenised only when the recipe's losses need their groups (`settings.groups`):
- `gold` (TPO triples): `gold_ids`, the gold response after the same prompt, cut like a completion;
- SRPO's revision groups: `revision_prompt_chosen_ids` / `revision_prompt_rejected_ids` (data/srpo.py,
  which also explains their truncation).
A `preference_probability` column (P(chosen beats rejected)), or `chosen_win_probability` and
`rejected_win_probability` (each response's win probability against the sampling policy, SPPO), when present,
are kept as per-example soft labels.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ..errors import UserError
from ..losses import LABEL_INPUTS, SEQUENCE_GROUPS
from .render import render_prompt_and_completion, tokenise_with_prompt

REQUIRED = ("chosen", "rejected")


# The row columns a recipe's `data.columns` may rename: the prompt, every answer a loss can score (the sequence
# groups that are not SRPO revisions, which are built from these) and the soft labels.
PAIR_COLUMNS = ("prompt", *(group for group in SEQUENCE_GROUPS if "_given_" not in group), *LABEL_INPUTS)


@dataclass(frozen=True)
class TokenisationSettings:
    max_length: int
    max_prompt_length: int
    prompt_truncation: str = "drop"
    system_prompt: str | None = None
    groups: tuple[str, ...] = ("chosen", "rejected")   # sequence groups the losses need
    generate_template: str | None = None              # SRPO's templates, set when its groups are needed
    revision_template: str | None = None
    min_example_tokens: int = 32
    # Bump when tokenisation changes: `datasets` fingerprints `tokenise_pair` by its own code, not by the helpers
    # it calls, so without this a file's cached tokenisation (and reference cache keys) would outlive the change.
    # 2: completions tokenised together with their prompt (TRL 1.16's boundary).
    tokenisation_version: int = 2

    def key(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_recipe(cls, recipe, groups=("chosen", "rejected")) -> "TokenisationSettings":
        from .srpo import needs_revisions

        data, srpo = recipe.data, recipe.method.srpo
        templates = {}
        if needs_revisions(groups):
            templates = dict(generate_template=srpo.generate_template, revision_template=srpo.revision_template,
                             min_example_tokens=srpo.min_example_tokens)
        return cls(data.max_length, data.max_prompt_length, data.prompt_truncation, data.system_prompt,
                   tuple(groups), **templates)


def normalise_rows(dataset, source):
    """A data source's rows -> preference rows: its column mapping, or the rated -> triples builder."""
    if source.format == "rated_to_triples":
        from .triples import rated_to_triples

        return rated_to_triples(dataset, source.columns, source.source, source.triple_margin)
    from .rows import check_preference_rows

    mapping = {name: column for name, column in source.columns.model_dump().items() if name in PAIR_COLUMNS}
    return check_preference_rows(apply_column_mapping(dataset, mapping, source.source), source.source)


def apply_column_mapping(dataset, mapping: dict[str, str], source: str):
    """Rename the dataset's columns to prompt/chosen/rejected, naming what is missing."""
    columns = set(dataset.column_names)
    renames = {}
    for canonical, actual in mapping.items():
        if actual in columns:
            if actual != canonical:
                renames[actual] = canonical
        elif canonical in REQUIRED or actual != canonical:
            raise UserError(f"Dataset '{source}' has no column '{actual}' (for '{canonical}'). Columns found: "
                            f"{', '.join(sorted(columns))}. Map yours with data.train.columns.{canonical}: NAME.")
    if renames:
        dataset = dataset.rename_columns(renames)
    if len(dataset) == 0:
        raise UserError(f"Dataset '{source}' is empty: it has no rows to train on.")
    return dataset


def tokenise_pair(row: dict, tokenizer, settings: TokenisationSettings) -> dict:
    """One preference row -> prompt ids, chosen ids, rejected ids (truncated per the policy), plus the
    extra sequences of `settings.groups` (gold ids, SRPO revision prompt ids)."""
    if row.get("prompt") is None:
        from .rows import complete_prompt

        row = complete_prompt(row)
    revisions = settings.revision_template is not None
    if revisions:
        from .render import Templates, generation_prompt

        plain_row = {**row, "prompt": generation_prompt(row["prompt"], Templates(settings.generate_template,
                                                                                 settings.revision_template))}
        return _with_revisions(tokenise_pair(plain_row, tokenizer, _without_revisions(settings)), row, tokenizer,
                               settings)
    conversational = not isinstance(row["prompt"], str)
    names = ("chosen", "rejected", "gold") if "gold" in settings.groups else ("chosen", "rejected")
    rendered = {name: render_prompt_and_completion(tokenizer, row["prompt"], row[name], settings.system_prompt)
                for name in names}
    prompt_text = rendered["chosen"][0]
    prompt_ids, completion_ids, boundary_moved = tokenise_with_prompt(
        tokenizer, prompt_text, {name: completion for name, (_, completion) in rendered.items()}, conversational)
    prompt_too_long = len(prompt_ids) > settings.max_prompt_length
    if prompt_too_long and settings.prompt_truncation == "keep_end":
        prompt_ids = prompt_ids[-settings.max_prompt_length:]
    room = max(settings.max_length - len(prompt_ids), 0)
    keep = not (prompt_too_long and settings.prompt_truncation == "drop") and room > 0
    result = {
        "prompt_ids": prompt_ids,
        **{f"{name}_ids": ids[:room] for name, ids in completion_ids.items()},
        "keep": keep,
        "prompt_length": len(prompt_ids),
        "completion_truncated": keep and any(len(ids) > room for ids in completion_ids.values()),
        "prompt_boundary_moved": boundary_moved,
    }
    for name in LABEL_INPUTS:
        if name in row:
            result[name] = float(row[name])
    return result


def _without_revisions(settings: TokenisationSettings) -> TokenisationSettings:
    from dataclasses import replace

    return replace(settings, revision_template=None)


def _with_revisions(plain: dict, row: dict, tokenizer, settings: TokenisationSettings) -> dict:
    """Add SRPO's revision prompt ids to a tokenised pair; cut its completions so every group fits."""
    from .srpo import tokenise_revision_prompts

    chosen_text = render_prompt_and_completion(tokenizer, row["prompt"], row["chosen"], settings.system_prompt)[1]
    room = settings.max_length - len(plain["prompt_ids"])
    # The plain completions are already cut to `room`, so their lengths are min(room, full length).
    completion_length = max(len(plain["chosen_ids"]), len(plain["rejected_ids"]))
    revision = tokenise_revision_prompts(row, room, completion_length, tokenizer, settings, chosen_text)
    limit = revision["completion_limit"]
    keep = plain["keep"] and revision["fits"]
    cut = keep and (len(plain["chosen_ids"]) > limit or len(plain["rejected_ids"]) > limit)
    return {**plain,
            "chosen_ids": plain["chosen_ids"][:max(limit, 0)],
            "rejected_ids": plain["rejected_ids"][:max(limit, 0)],
            "revision_prompt_chosen_ids": revision["revision_prompt_chosen_ids"],
            "revision_prompt_rejected_ids": revision["revision_prompt_rejected_ids"],
            "keep": keep,
            "completion_truncated": plain["completion_truncated"] or cut,
            "examples_truncated": revision["examples_truncated"] if keep else 0,
            "revision_dropped": plain["keep"] and not revision["fits"]}


def default_num_proc(rows: int) -> int:
    # Worker start-up costs more than it saves on small sets.
    return 1 if rows < 5000 else max(1, min(8, os.cpu_count() or 1))


def tokenise_preferences(dataset, tokenizer, settings: TokenisationSettings, source: str, num_proc: int | None = None):
    """Tokenise every row with `datasets.map` (cached on disk, parallel for large sets), apply the
    truncation policy and return `(dataset, report)`. Kept rows get `row_index` = their position in
    the returned dataset (what reference caches index by) and `source_row` = their row in the source."""
    if "gold" in settings.groups and "gold" not in dataset.column_names:
        raise UserError(f"Dataset '{source}' has no gold response column, which the loss needs (TPO with alpha > 0). "
                        f"Map it with data.train.columns.gold: NAME, or build triples from rated data with "
                        f"data.train.format: rated_to_triples (or set the loss's alpha: 0).")
    if "prompt" not in dataset.column_names:  # rows not checked by normalise_rows: recover their prompts first
        from .rows import check_preference_rows

        dataset = check_preference_rows(dataset, source)
    dataset = dataset.map(lambda _, index: {"source_row": index}, with_indices=True)
    try:
        tokenised = dataset.map(
            tokenise_pair,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            remove_columns=[c for c in dataset.column_names if c != "source_row"],
            num_proc=num_proc or default_num_proc(len(dataset)),
            desc="Tokenising",
        )
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(f"Dataset '{source}': a row could not be read as a preference pair ({error}). "
                        f"Rows need chosen/rejected (and optionally prompt) as strings or chat message lists.") from None
    dropped = len(tokenised) - sum(tokenised["keep"])
    report = {"rows": len(tokenised), "dropped_long_prompts": dropped,
              "truncated_completions": int(sum(tokenised["completion_truncated"])),
              "moved_prompt_boundaries": int(sum(tokenised["prompt_boundary_moved"]))}
    bookkeeping = ["keep", "completion_truncated", "prompt_boundary_moved"]
    if report["moved_prompt_boundaries"]:
        warnings.warn(f"Dataset '{source}': in {report['moved_prompt_boundaries']} of {len(tokenised)} rows the prompt's "
                      f"last tokens merge with the completion's first (e.g. a prompt ending in a space); the completion "
                      f"starts where prompt + completion and the prompt alone tokenise differently (as TRL does), so the "
                      f"token spanning the boundary is scored as completion. End prompts on a token boundary (no trailing "
                      f"space) to avoid it.", stacklevel=2)
    if "revision_dropped" in tokenised.column_names:
        from .srpo import warn_revision_truncation

        revision_dropped = int(sum(tokenised["revision_dropped"]))
        report.update(dropped_long_prompts=dropped - revision_dropped, dropped_long_revision_prompts=revision_dropped,
                      truncated_examples=int(sum(tokenised["examples_truncated"])))
        bookkeeping += ["revision_dropped", "examples_truncated"]
        warn_revision_truncation(report, source)
        if revision_dropped and dropped == len(tokenised):
            raise UserError(f"Dataset '{source}': no SRPO revision prompt (prompt + example answer) leaves room for a "
                            f"completion within data.max_length={settings.max_length}. Raise data.max_length or lower "
                            f"method.srpo.min_example_tokens.")
    if dropped == len(tokenised):
        raise UserError(f"Dataset '{source}': every prompt is longer than data.max_prompt_length="
                        f"{settings.max_prompt_length} tokens (shortest: {min(tokenised['prompt_length'])}). "
                        f"Raise data.max_prompt_length (and data.max_length), or set data.prompt_truncation: keep_end.")
    if dropped:
        tokenised = tokenised.filter(lambda keep: keep, input_columns="keep")
    tokenised = tokenised.remove_columns(bookkeeping)
    return tokenised.map(lambda _, index: {"row_index": index}, with_indices=True), report
