"""Data formats, column mapping, token masks and the truncation policy."""

import pytest
from datasets import Dataset

from align_cli.data.batching import IGNORE, DataOrder, collate_pairs, seeded_permutation
from align_cli.data.preference import TokenisationSettings, apply_column_mapping, tokenise_preferences
from align_cli.data.sources import builtin_datasets, load_source
from align_cli.errors import UserError

SETTINGS = TokenisationSettings(max_length=128, max_prompt_length=96)
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def tokenise(rows, tokenizer, settings=SETTINGS):
    return tokenise_preferences(Dataset.from_list(rows), tokenizer, settings, "test")


def test_conversational_explicit_prompt_uses_chat_template(tokenizer):
    data, report = tokenise([{"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}],
                              "rejected": [{"role": "assistant", "content": "5"}]}], tokenizer)
    row = data[0]
    prompt_text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["prompt_ids"]) == prompt_text
    assert tokenizer.decode(row["chosen_ids"]).startswith("4<|im_end|>")
    assert tokenizer.decode(row["rejected_ids"]).startswith("5<|im_end|>")
    assert report == {"rows": 1, "dropped_long_prompts": 0, "truncated_completions": 0, "moved_prompt_boundaries": 0}


def test_implicit_prompt_is_extracted(tokenizer):
    conversation = lambda answer: USER + [{"role": "assistant", "content": answer}]  # noqa: E731
    explicit, _ = tokenise([{"prompt": USER, "chosen": conversation("4")[1:], "rejected": conversation("5")[1:]}], tokenizer)
    implicit, _ = tokenise([{"chosen": conversation("4"), "rejected": conversation("5")}], tokenizer)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert implicit[0][key] == explicit[0][key]


def test_string_format_is_raw_text_with_eos(tokenizer):
    data, _ = tokenise([{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}], tokenizer)
    assert tokenizer.decode(data[0]["chosen_ids"]) == " 4" + tokenizer.eos_token
    implicit, _ = tokenise([{"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}],
                           tokenizer)
    assert tokenizer.decode(implicit[0]["chosen_ids"]) == " 4" + tokenizer.eos_token


def test_targets_cover_exactly_the_completion_tokens(tokenizer):
    data, _ = tokenise([{"prompt": USER, "chosen": [{"role": "assistant", "content": "four"}],
                         "rejected": [{"role": "assistant", "content": "it is five"}]}], tokenizer)
    grouped = collate_pairs([data[0]], tokenizer.pad_token_id)
    batch = grouped.sequences
    for row, completion in enumerate((data[0]["chosen_ids"], data[0]["rejected_ids"])):
        trained = batch.targets[row][batch.targets[row] != IGNORE].tolist()
        assert trained == completion
        assert set(batch.sequence_index[row][batch.targets[row] != IGNORE].tolist()) == {row}
    assert grouped.groups == {"chosen": slice(0, 1), "rejected": slice(1, 2)}
    assert grouped.lengths["chosen"].tolist() == [len(data[0]["chosen_ids"])]


def test_truncation_policy(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}]
    short = {"prompt": USER, "chosen": [{"role": "assistant", "content": "x " * 300}],
             "rejected": [{"role": "assistant", "content": "y"}]}
    rows = [short, {**short, "prompt": long_prompt}]
    dropped, report = tokenise(rows, tokenizer)
    assert len(dropped) == 1 and report["dropped_long_prompts"] == 1 and report["truncated_completions"] == 1
    assert len(dropped[0]["prompt_ids"]) + len(dropped[0]["chosen_ids"]) == SETTINGS.max_length
    kept, _ = tokenise(rows, tokenizer, TokenisationSettings(128, 96, "keep_end"))
    assert len(kept) == 2 and len(kept[1]["prompt_ids"]) == 96
    assert kept[1]["prompt_ids"][-3:] == dropped[0]["prompt_ids"][-3:], "keep_end keeps the generation prompt"
    with pytest.raises(UserError, match="every prompt is longer than data.max_prompt_length=96"):
        tokenise([{**short, "prompt": long_prompt}], tokenizer)


def test_column_mapping_and_missing_column():
    data = Dataset.from_list([{"question": "q", "good": "a", "bad": "b"}])
    mapped = apply_column_mapping(data, {"prompt": "question", "chosen": "good", "rejected": "bad"}, "f.jsonl")
    assert set(mapped.column_names) == {"prompt", "chosen", "rejected"}
    with pytest.raises(UserError, match=r"no column 'chosen'.*Columns found: bad, good, question"):
        apply_column_mapping(data, {"prompt": "question", "chosen": "chosen", "rejected": "bad"}, "f.jsonl")
    with pytest.raises(UserError, match="is empty"):
        apply_column_mapping(Dataset.from_list([]).add_column("chosen", []).add_column("rejected", []),
                             {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, "e.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_load(tmp_path, suffix):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    path = tmp_path / f"data{suffix}"
    Dataset.from_list(rows).to_json(path) if suffix in (".jsonl", ".json") else (
        Dataset.from_list(rows).to_parquet(path) if suffix == ".parquet" else Dataset.from_list(rows).to_csv(path, index=False))
    assert load_source(str(path))[0] == rows[0]


def test_builtin_sets_and_missing_sources():
    assert {"arithmetic_pairs", "arithmetic_rated", "arithmetic_prompts"} <= set(builtin_datasets())
    assert len(load_source("builtin:arithmetic_pairs", "test")) == 100
    with pytest.raises(UserError, match="Unknown builtin dataset"):
        load_source("builtin:nope")
    with pytest.raises(UserError, match="does not exist"):
        load_source("./missing.jsonl")
    with pytest.raises(UserError, match="could not be loaded: hub access is switched off"):
        load_source("someone/some-dataset")


def test_data_order_is_a_pure_function_and_ranks_are_disjoint():
    order = DataOrder(num_rows=20, batch_size=3, seed=5)
    assert order.batch(4) == DataOrder(20, 3, 5).batch(4)
    epoch = [row for k in range(order.batches_per_epoch) for row in order.batch(k)]
    assert len(set(epoch)) == len(epoch) == 18
    ranks = [DataOrder(20, 3, 5, world_size=2, rank=r).batch(1) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert order.batch(order.batches_per_epoch) != order.batch(0), "each epoch is a new permutation"


def test_objective_asks_for_the_groups_its_losses_take():
    from align_cli.config import LossTerm
    from align_cli.pairwise.objective import Objective

    dpo = Objective([LossTerm(name="dpo"), LossTerm(name="sft", weight=0.5)])
    assert dpo.policy_groups == ["chosen", "rejected"] and dpo.reference_groups == ["chosen", "rejected"]
    tpo = Objective([LossTerm(name="tpo", alpha=1.0)])
    assert tpo.policy_groups == ["chosen", "rejected", "gold"] and not tpo.needs_reference


def test_one_seeded_permutation_orders_pairs_and_rl_prompts():
    """Pairwise batches and online-RL prompts walk the same per-epoch permutation of (seed, epoch), whatever
    the cache holds: it is torch.randperm under the generator seeded seed * 1_000_003 + epoch."""
    import torch

    from align_cli.rl.data import PromptOrder

    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_003 + 1))
    assert seeded_permutation(10, 5, 1).tolist() == expected.tolist()
    assert DataOrder(num_rows=10, batch_size=5, seed=5).batch(2) == expected[:5].tolist()  # epoch 1's first batch
    assert PromptOrder(10, seed=5).take(10, 5) == expected[:5].tolist()
