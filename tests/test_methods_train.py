"""f-DPO, TPO, TPO-L and SRPO recipes' shapes trained on the tiny model: groups, reference, summaries."""

import random

import pytest
from conftest import write_jsonl

from align_cli import tasks
from align_cli.pairwise.trainer import train
from align_cli.recipe import load_recipe

NO_TASK = {"evaluation__task": None, "output__save_final_model": False, "checkpointing__every": None,
           "logging__tensorboard": False, "training__max_steps": 2}


def run(path, *overrides):
    recipe, resolved = load_recipe(str(path), list(overrides))
    return train(recipe, resolved)


@pytest.fixture
def rated_file(tmp_path):
    rng = random.Random(0)
    return write_jsonl(tmp_path / "rated.jsonl", [tasks.rated_row(p, rng) for p in tasks.make_problems(24, seed=7)])


@pytest.fixture
def spy_groups(monkeypatch):
    """Record the groups of every batch the trainer collates and every reference call's outputs."""
    import align_cli.pairwise.reference as reference
    import align_cli.pairwise.trainer as trainer

    seen = {"policy": set(), "reference": set()}
    collate, live = trainer.collate_groups, reference.LiveReference.__call__

    def collate_spy(examples, names, pad_id):
        seen["policy"].add(tuple(names))
        return collate(examples, names, pad_id)

    def live_spy(self, batch):
        result = live(self, batch)
        seen["reference"].add(tuple(sorted(result)))
        return result

    monkeypatch.setattr(trainer, "collate_groups", collate_spy)
    monkeypatch.setattr(reference.LiveReference, "__call__", live_spy)
    return seen


def test_method_names_default_to_their_loss():
    from align_cli.config import MethodConfig

    assert [t.name for t in MethodConfig(name="srpo").losses] == ["srpo"]
    assert [t.name for t in MethodConfig(name="tpo").losses] == ["tpo"]
    assert [t.name for t in MethodConfig(name="tpo", losses=[{"name": "tpo_l"}]).losses] == ["tpo_l"]


def test_fdpo_moves_the_reward_margin(tiny_recipe):
    summary = run(tiny_recipe(method__losses=[{"name": "fdpo", "divergence": "alpha", "alpha": 0.5, "beta": 0.1}],
                              **NO_TASK))
    assert summary["before"]["rewards/margins"] == 0.0, "policy = reference at the start"
    assert summary["after"]["rewards/margins"] > 0.0


def test_tpo_trains_on_rated_data_without_a_reference(tiny_recipe, rated_file, monkeypatch, spy_groups):
    import align_cli.run_setup as setup

    loaded = []
    original = setup.load_causal_lm
    monkeypatch.setattr(setup, "load_causal_lm", lambda *a, **k: loaded.append(a[0]) or original(*a, **k))
    summary = run(tiny_recipe(data__train={"source": str(rated_file), "format": "rated_to_triples"},
                              method__name="tpo", method__losses=[{"name": "tpo", "alpha": 1.0}], **NO_TASK))
    assert len(loaded) == 1, "TPO is reference-free: only the policy is loaded"
    assert summary["method"] == "tpo" and "reference" not in summary
    assert spy_groups["policy"] == {("chosen", "rejected", "gold")} and not spy_groups["reference"]
    assert summary["after"]["nll/gold"] < summary["before"]["nll/gold"], "the gold NLL falls"


def test_tpo_alpha_zero_skips_the_gold_forward(tiny_recipe, rated_file, spy_groups):
    summary = run(tiny_recipe(data__train={"source": str(rated_file), "format": "rated_to_triples"},
                              method__name="tpo", method__losses=[{"name": "tpo", "alpha": 0}], **NO_TASK))
    assert spy_groups["policy"] == {("chosen", "rejected")}, "no gold sequences are collated"
    assert "nll/gold" not in summary["after"]


def test_tpo_l_on_triple_columns(tiny_recipe, tmp_path, rated_file):
    import json

    from align_cli.data.triples import rated_to_triple

    rows = [json.loads(line) for line in rated_file.read_text().splitlines()]
    triples = [{**{k: v for k, v in rated_to_triple(r["prompt"], r["completions"]).items() if k != "gold"},
                "reference_answer": rated_to_triple(r["prompt"], r["completions"])["gold"]} for r in rows]
    path = write_jsonl(tmp_path / "triples.jsonl", triples)
    summary = run(tiny_recipe(data__train={"source": str(path), "columns": {"gold": "reference_answer"}},
                              method__name="tpo", method__losses=[{"name": "tpo_l", "beta": 2.0, "gamma": 0.5}],
                              **NO_TASK))
    assert summary["after"]["nll/gold"] < summary["before"]["nll/gold"]


def test_srpo_scores_six_groups_with_policy_and_reference_and_reports_revisions(tiny_recipe, spy_groups):
    summary = run(tiny_recipe(method__name="srpo", method__losses=[{"name": "srpo"}], method__srpo={"revisions": 1, "draft_temperature": 1.0},
                              data__max_length=140, data__max_prompt_length=80,
                              evaluation__num_prompts=2, evaluation__max_new_tokens=3,
                              **{**NO_TASK, "evaluation__task": "arithmetic"}))
    groups = ("chosen", "rejected", "chosen_given_rejected", "rejected_given_rejected", "chosen_given_chosen",
              "rejected_given_chosen")
    assert spy_groups["policy"] == {groups}
    assert spy_groups["reference"] == {tuple(sorted(f"ref_{g}" for g in groups))}
    for when in ("before", "after"):
        assert {"revision_0/accuracy", "revision_1/accuracy", "revision_1/win_rate_vs_0"} <= set(summary[when])
        assert {"sampled_draft/revision_0/accuracy", "sampled_draft/revision_1/wins_vs_0"} <= set(summary[when])
    assert summary["after"]["loss"] < summary["before"]["loss"]
