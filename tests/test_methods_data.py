"""Data for f-DPO / TPO / SRPO: triples and their builder, SRPO's revision sequences and their truncation."""

import json
import random
import warnings

import pytest
from datasets import Dataset

from align_cli import tasks
from align_cli.config import ColumnMap, DataSource, LossTerm, SrpoConfig
from align_cli.data.batching import IGNORE, collate_groups
from align_cli.data.preference import TokenisationSettings, normalise_rows, tokenise_preferences
from align_cli.data.render import Templates, render_prompts, revision_prompt
from align_cli.data.sources import load_source
from align_cli.data.srpo import REVISION_GROUPS
from align_cli.data.triples import rated_to_triple, rated_to_triples
from align_cli.errors import UserError
from align_cli.pairwise.objective import Objective

USER = [{"role": "user", "content": "What is 2 + 2? Reply with just the equation and its result."}]
SRPO_GROUPS = ("chosen", "rejected", *REVISION_GROUPS)


def assistant(text):
    return [{"role": "assistant", "content": text}]


def srpo_settings(max_length=160, max_prompt_length=96, min_example_tokens=32, **templates):
    config = SrpoConfig(min_example_tokens=min_example_tokens, **templates)
    return TokenisationSettings(max_length, max_prompt_length, groups=SRPO_GROUPS,
                                generate_template=config.generate_template,
                                revision_template=config.revision_template,
                                min_example_tokens=config.min_example_tokens)


def test_rated_rows_become_gold_chosen_rejected():
    completions = [{"response": "ok", "score": 6}, {"response": "bad", "score": 1},
                   {"response": "best", "score": 9}, {"response": "meh", "score": 3}]
    assert rated_to_triple("Q?", completions) == {"prompt": "Q?", "gold": "best", "chosen": "ok", "rejected": "bad"}
    chat = rated_to_triple(USER, completions)
    assert chat["gold"] == assistant("best") and chat["rejected"] == assistant("bad")
    # UltraFeedback names its rating `overall_score`; unscored responses are ignored.
    ultra = [{"text": "a", "overall_score": 2.0}, {"text": "b", "overall_score": 8.5},
             {"text": "c", "overall_score": 5.0}, {"text": "d", "overall_score": None}]
    assert rated_to_triple("Q", ultra, "text", "overall_score") == {"prompt": "Q", "gold": "b", "chosen": "c",
                                                                     "rejected": "a"}
    assert rated_to_triple("Q", completions[:2]) is None, "fewer than three responses make no triple"
    tie = [{"response": "a", "score": 9}, {"response": "b", "score": 2}, {"response": "c", "score": 2}]
    assert rated_to_triple("Q", tie) is None, "second and lowest tie: no preference"


def test_triples_keep_the_released_data_score_gaps():
    """The TPO authors' released triples: chosen >= 2 points below gold, rejected >= 2 below chosen."""
    def rated(*scores):
        return [{"response": f"r{score}", "score": score} for score in scores]

    # gold 9; 8 is too close to it, so the chosen is 7; the rejected 5 is 2 below it: kept.
    assert rated_to_triple("Q", rated(9, 8, 7, 5)) == {"prompt": "Q", "gold": "r9", "chosen": "r7", "rejected": "r5"}
    assert rated_to_triple("Q", rated(9, 8, 7, 6)) is None, "the rejected only 1 below the chosen"
    assert rated_to_triple("Q", rated(9, 8, 8)) is None, "no response 2 below the gold"
    assert rated_to_triple("Q", rated(9, 7, 6)) is None, "the chosen 7 leaves no rejected 2 below it"
    # margin 0: the second and the lowest, any strict gap (the builder's behaviour before the rule).
    assert rated_to_triple("Q", rated(9, 8, 7, 6), margin=0) == {"prompt": "Q", "gold": "r9", "chosen": "r8",
                                                                   "rejected": "r6"}
    assert rated_to_triple("Q", rated(9, 9, 7), margin=0)["chosen"] == "r9", "a tie with the gold is kept at margin 0"
    assert rated_to_triple("Q", rated(9, 7, 7), margin=0) is None, "chosen and rejected tie: no preference"
    assert rated_to_triple("Q", rated(9.0, 8.5, 7.5, 6.0), margin=1.5)["chosen"] == "r7.5"
    rows = [{"prompt": f"Q{i}", "completions": rated(*scores)}
            for i, scores in enumerate([(9, 7, 5), (9, 8, 8), (9, 7, 6), (9, 7, 6), (4, 2)])]
    with pytest.warns(UserWarning) as caught:
        triples = rated_to_triples(Dataset.from_list(rows), ColumnMap(), "r.jsonl")
    assert len(triples) == 1 and triples[0]["chosen"] == "r7"
    message = str(caught[0].message)
    assert "4 of 5 rated rows made no triple" in message
    assert "2 with no response at least 2 points below the chosen" in message
    assert "1 with no response at least 2 points below the best" in message and "1 with fewer than 3" in message
    source = DataSource(source="r.jsonl", format="rated_to_triples", triple_margin=1)
    with pytest.warns(UserWarning, match="2 of 5"):
        assert len(normalise_rows(Dataset.from_list(rows), source)) == 3
    with pytest.raises(UserError, match="no rated row makes a TPO triple.*triple_margin"):
        rated_to_triples(Dataset.from_list(rows[1:2]), ColumnMap(), "r.jsonl")


def test_rated_dataset_builder_drops_with_a_warning_and_maps_columns():
    rows = [{"question": "Q1", "answers": [{"response": "a", "score": 5}, {"response": "b", "score": 3},
                                            {"response": "c", "score": 1}]},
            {"question": "Q2", "answers": [{"response": "a", "score": 3}]}]
    columns = ColumnMap(prompt="question", completions="answers")
    with pytest.warns(UserWarning, match="1 of 2 rated rows made no triple"):
        triples = rated_to_triples(Dataset.from_list(rows), columns, "r.jsonl")
    assert triples[0] == {"prompt": "Q1", "gold": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(UserError, match="no column 'completions' for format: rated_to_triples"):
        rated_to_triples(Dataset.from_list(rows), ColumnMap(prompt="question"), "r.jsonl")
    source = DataSource(source="r.jsonl", format="rated_to_triples", columns=columns)
    with pytest.warns(UserWarning):
        assert len(normalise_rows(Dataset.from_list(rows), source)) == 1


def test_shipped_triples_are_the_builder_applied_to_the_rated_set():
    rated = load_source("builtin:arithmetic_rated", "test")
    triples = load_source("builtin:arithmetic_triples", "test")
    for index in (0, 17, 99):
        built = rated_to_triple(rated[index]["prompt"], rated[index]["completions"])
        assert {k: triples[index][k] for k in built} == built
        assert built["gold"] == assistant(rated[index]["answer"]), "the gold answer is the correct bare equation"


def test_gold_column_is_mapped_and_tokenised_only_when_needed(tokenizer):
    rows = [{"prompt": USER, "reference": assistant("2 + 2 = 4"), "chosen": assistant("2 + 2 = 4, easy."),
             "rejected": assistant("2 + 2 = 5")}]
    mapped = normalise_rows(Dataset.from_list(rows), DataSource(source="t.jsonl", columns=ColumnMap(gold="reference")))
    gold_settings = TokenisationSettings(128, 96, groups=("chosen", "rejected", "gold"))
    data, _ = tokenise_preferences(mapped, tokenizer, gold_settings, "t.jsonl")
    assert tokenizer.decode(data[0]["gold_ids"]).startswith("2 + 2 = 4<|im_end|>")
    batch = collate_groups([data[0]], ["chosen", "rejected", "gold"], tokenizer.pad_token_id)
    trained = batch.sequences.targets[batch.groups["gold"].start]
    assert trained[trained != IGNORE].tolist() == data[0]["gold_ids"]
    pairs_only, _ = tokenise_preferences(mapped, tokenizer, TokenisationSettings(128, 96), "t.jsonl")
    assert "gold_ids" not in pairs_only.column_names, "no gold ids unless a loss needs the gold group"
    with pytest.raises(UserError, match="no gold response column.*columns.gold"):
        tokenise_preferences(Dataset.from_list([{k: v for k, v in rows[0].items() if k != "reference"}]), tokenizer,
                             gold_settings, "t.jsonl")


def test_tpo_with_alpha_zero_asks_for_no_gold_group():
    assert "gold" in Objective([LossTerm(name="tpo", alpha=1.0)]).policy_groups
    for name in ("tpo", "tpo_l"):
        objective = Objective([LossTerm(name=name, alpha=0.0)])
        assert objective.policy_groups == ["chosen", "rejected"] and not objective.needs_reference


def test_srpo_needs_six_groups_from_policy_and_reference():
    objective = Objective([LossTerm(name="srpo")])
    assert objective.policy_groups == list(SRPO_GROUPS) and objective.reference_groups == list(SRPO_GROUPS)


def test_revision_prompt_shows_the_example_and_matches_inference(tokenizer):
    row = {"prompt": USER, "chosen": assistant("2 + 2 = 4"), "rejected": assistant("2 + 2 = 5\n\nThis is simple.")}
    settings = srpo_settings()
    data, report = tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")
    example = data[0]
    templates = Templates(settings.generate_template, settings.revision_template)
    for name in ("chosen", "rejected"):
        shown = row[name][0]["content"]
        text = tokenizer.decode(example[f"revision_prompt_{name}_ids"])
        assert shown in text and "What is 2 + 2?" in text
        # The same template renders the same tokens at inference (align generate --revisions).
        assert text == render_prompts(tokenizer, [revision_prompt(USER, shown, templates)])[0]
    assert report["truncated_examples"] == 0 and report["dropped_long_revision_prompts"] == 0
    batch = collate_groups([example], list(SRPO_GROUPS), tokenizer.pad_token_id)
    assert batch.sequences.num_sequences == 6, "all six sequences in one forward"
    completion_of = {"chosen_given_rejected": "chosen_ids", "rejected_given_rejected": "rejected_ids",
                     "chosen_given_chosen": "chosen_ids", "rejected_given_chosen": "rejected_ids"}
    for group, column in completion_of.items():
        row_targets = batch.sequences.targets[batch.groups[group].start]
        assert row_targets[row_targets != IGNORE].tolist() == example[column]
    prompt_of = {"chosen_given_rejected": "revision_prompt_rejected_ids", "chosen_given_chosen": "revision_prompt_chosen_ids"}
    for group, column in prompt_of.items():
        row_ids = batch.sequences.input_ids[batch.groups[group].start].tolist()
        assert row_ids[: len(example[column])] == example[column]


def test_generation_template_applies_to_the_plain_prompt(tokenizer):
    row = {"prompt": USER, "chosen": assistant("2 + 2 = 4"), "rejected": assistant("5")}
    settings = srpo_settings(generate_template="Task: {prompt}")
    data, _ = tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")
    assert "Task: What is 2 + 2?" in tokenizer.decode(data[0]["prompt_ids"])
    assert "Task: What is 2 + 2?" not in tokenizer.decode(data[0]["revision_prompt_chosen_ids"])


def test_truncation_cuts_the_example_first_then_the_completion(tokenizer):
    long_answer = " ".join(f"word{i}" for i in range(60))
    row = {"prompt": USER, "chosen": assistant("2 + 2 = 4"), "rejected": assistant(long_answer)}
    rejected_tokens = len(tokenizer(long_answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    full, _ = tokenise_preferences(Dataset.from_list([row]), tokenizer, srpo_settings(max_length=1000, max_prompt_length=500), "t.jsonl")
    needed = len(full[0]["revision_prompt_rejected_ids"]) + rejected_tokens
    example_tokens = len(tokenizer(long_answer, add_special_tokens=False)["input_ids"])

    # 1. A little too long: only the example loses tokens; the completions stay whole.
    settings = srpo_settings(max_length=needed - 20, min_example_tokens=8)
    with pytest.warns(UserWarning, match="cut the example answer of 1 revision prompts"):
        cut, report = tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")
    assert report["truncated_examples"] == 1 and report["truncated_completions"] == 0
    assert cut[0]["rejected_ids"] == full[0]["rejected_ids"]
    shown = tokenizer.decode(cut[0]["revision_prompt_rejected_ids"])
    assert "word0 word1" in shown and "word59" not in shown
    assert "Write an improved answer" in shown, "the template's end survives: the example is cut inside it"
    assert len(cut[0]["revision_prompt_rejected_ids"]) + len(cut[0]["rejected_ids"]) <= settings.max_length

    # 2. Much too long: the example stops at min_example_tokens, then the completions are cut (in every group).
    settings = srpo_settings(max_length=needed - example_tokens - 10, min_example_tokens=8)
    with pytest.warns(UserWarning, match="1 completions cut"):
        cut, report = tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")
    assert report["truncated_examples"] == 1 and report["truncated_completions"] == 1
    shown = tokenizer.decode(cut[0]["revision_prompt_rejected_ids"])
    assert "word0" in shown, "the example answer is never cut away"
    for prompt in ("prompt_ids", "revision_prompt_chosen_ids", "revision_prompt_rejected_ids"):
        assert len(cut[0][prompt]) + len(cut[0]["rejected_ids"]) <= settings.max_length
    assert cut[0]["rejected_ids"] == full[0]["rejected_ids"][: len(cut[0]["rejected_ids"])]

    # 3. No room for any completion beside the shortest allowed example: the row is dropped, with a clear error.
    settings = srpo_settings(max_length=len(full[0]["prompt_ids"]) + 30, max_prompt_length=len(full[0]["prompt_ids"]) + 1,
                             min_example_tokens=60)
    with warnings.catch_warnings(), pytest.raises(UserError, match="no SRPO revision prompt"):
        warnings.simplefilter("ignore")
        tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")


def test_soft_labels_reach_the_batch(tokenizer):
    rows = [{"prompt": USER, "chosen": assistant("4"), "rejected": assistant("5"), "preference_probability": p}
            for p in (0.9, 0.6)]
    data, _ = tokenise_preferences(Dataset.from_list(rows), tokenizer, srpo_settings(), "t.jsonl")
    batch = collate_groups([data[0], data[1]], list(SRPO_GROUPS), tokenizer.pad_token_id)
    assert batch.labels["preference_probability"].tolist() == pytest.approx([0.9, 0.6])
    plain, _ = tokenise_preferences(Dataset.from_list([{k: v for k, v in rows[0].items() if k != "preference_probability"}]),
                                    tokenizer, TokenisationSettings(128, 96), "t.jsonl")
    assert collate_groups([plain[0]], ["chosen", "rejected"], tokenizer.pad_token_id).labels == {}


def test_string_prompts_get_the_templates_as_raw_text(tokenizer):
    row = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
    settings = srpo_settings(revision_template="{prompt} (previously:{example}) Better answer:")
    data, _ = tokenise_preferences(Dataset.from_list([row]), tokenizer, settings, "t.jsonl")
    assert tokenizer.decode(data[0]["revision_prompt_rejected_ids"]) == "Q: 2+2?\nA: (previously: 5) Better answer:"


def test_recipe_validates_templates():
    with pytest.raises(ValueError, match="must contain"):
        SrpoConfig(revision_template="no placeholders")
    assert json.dumps(TokenisationSettings(128, 96).key())  # cache keys stay JSON


def test_pair_rows_for_srpo_have_a_correct_chosen_answer():
    rng = random.Random(0)
    row = tasks.pair_row(tasks.make_problems(1, seed=3)[0], rng)
    assert tasks.is_correct(row["chosen"][0]["content"], row["answer"])


def test_sppo_win_probabilities_reach_the_batch(tokenizer):
    rows = [{"prompt": USER, "chosen": assistant("4"), "rejected": assistant("5"), "chosen_win_probability": win,
             "rejected_win_probability": loss} for win, loss in ((0.875, 0.125), (0.75, 0.5))]
    data, _ = tokenise_preferences(Dataset.from_list(rows), tokenizer, TokenisationSettings(128, 96), "t.jsonl")
    batch = collate_groups([data[0], data[1]], ["chosen", "rejected"], tokenizer.pad_token_id)
    assert batch.labels["chosen_win_probability"].tolist() == pytest.approx([0.875, 0.75])
    assert batch.labels["rejected_win_probability"].tolist() == pytest.approx([0.125, 0.5])
