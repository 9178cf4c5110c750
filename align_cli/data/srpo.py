"""SRPO's self-improvement sequences: the revision prompts `(x, y_w)` and `(x, y_l)`, tokenised and truncated.

With the pair's completions `chosen_ids` / `rejected_ids`, they form the four groups
`y_w|(x,y_l), y_l|(x,y_l), y_w|(x,y_w), y_l|(x,y_w)` (data/batching.py `GROUP_COLUMNS`); with the plain
groups `y_w|x, y_l|x` these are SRPO's six sequences, scored in one forward of the policy and one of the
reference. Every group scores the same completion tokens, so a cut completion is cut in all six.

Truncation (a revision sequence longer than `data.max_length`) never drops the example answer:
1. the example loses its end, down to `min_example_tokens` tokens (never below, never to nothing);
2. then the completions lose their end so that the longest revision prompt plus completion fits;
3. a row whose revision prompt alone leaves no room for a completion is dropped.
Each step is counted and reported in a warning.
"""

from __future__ import annotations

import warnings

from .render import Templates, answer_text, prompt_token_ids, render_prompt_and_completion, revision_prompt

REVISION_GROUPS = ("chosen_given_rejected", "rejected_given_rejected", "chosen_given_chosen", "rejected_given_chosen")


def needs_revisions(groups) -> bool:
    return any(group in REVISION_GROUPS for group in groups)


def _revision_prompt_ids(row, example: str, example_ids: list[int], keep: int, tokenizer, settings,
                         expected_completion: str) -> list[int]:
    if keep < len(example_ids):
        example = tokenizer.decode(example_ids[:keep])
    templates = Templates(settings.generate_template, settings.revision_template)
    prompt = revision_prompt(row["prompt"], example, templates)
    prompt_text, completion_text = render_prompt_and_completion(tokenizer, prompt, row["chosen"], settings.system_prompt)
    if completion_text != expected_completion:
        raise ValueError("the chat template renders the completion differently after the revision prompt; "
                         "SRPO needs the same completion tokens in both prompts")
    return prompt_token_ids(tokenizer, prompt_text, not isinstance(prompt, str))


def tokenise_revision_prompts(row: dict, completion_room: int, completion_length: int, tokenizer, settings,
                              expected_completion: str) -> dict:
    """Revision prompt ids for both examples and the completion length that fits beside them.

    `completion_room`: tokens the plain prompt leaves for a completion; `completion_length`: the longer of the
    two (uncut) completions. Returns the two prompt id lists, `completion_limit` (how many completion tokens
    every group keeps), `examples_truncated` (0..2) and `fits` (False: drop the row)."""
    limit = min(completion_room, completion_length)
    result = {"examples_truncated": 0}
    for name in ("chosen", "rejected"):
        example = answer_text(row[name])
        example_ids = tokenizer(example, add_special_tokens=False)["input_ids"]
        keep = len(example_ids)
        ids = _revision_prompt_ids(row, example, example_ids, keep, tokenizer, settings, expected_completion)
        floor = min(settings.min_example_tokens, len(example_ids))
        # Boundary merges make token counts of the re-rendered prompt inexact: shorten until it fits or hits the floor.
        for _ in range(4):
            overflow = len(ids) + limit - settings.max_length
            if overflow <= 0 or keep <= floor:
                break
            keep = max(floor, keep - overflow)
            ids = _revision_prompt_ids(row, example, example_ids, keep, tokenizer, settings, expected_completion)
        result["examples_truncated"] += int(keep < len(example_ids))
        result[f"revision_prompt_{name}_ids"] = ids
    longest = max(len(result["revision_prompt_chosen_ids"]), len(result["revision_prompt_rejected_ids"]))
    result["completion_limit"] = min(limit, settings.max_length - longest)
    result["fits"] = result["completion_limit"] > 0
    return result


def warn_revision_truncation(report: dict, source: str) -> None:
    """Say how many SRPO examples and rows the truncation policy touched."""
    if report.get("truncated_examples") or report.get("dropped_long_revision_prompts"):
        warnings.warn(f"Dataset '{source}': SRPO revision prompts over data.max_length: cut the example answer of "
                      f"{report['truncated_examples']} revision prompts (kept at least method.srpo.min_example_tokens), "
                      f"{report['truncated_completions']} completions cut (in all six sequences), "
                      f"{report['dropped_long_revision_prompts']} of {report['rows']} rows dropped (no room left for "
                      f"a completion).", stacklevel=3)
