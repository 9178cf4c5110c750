"""Pair building and ordering for APO (best vs worst) and Curry-DPO (best vs each, easy to hard), ties
dropped, and the unshuffled data order a curriculum trains in."""

from align_cli.data.batching import DataOrder
from align_cli.iterative.pairs import as_row, best_vs_each, best_vs_worst, curriculum_stages, easy_to_hard, order_by


def test_best_vs_worst_takes_extremes_and_drops_all_tied():
    pair = best_vs_worst(3, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0])
    assert (pair.prompt_index, pair.chosen, pair.rejected, pair.gap) == (3, "b", "c", 1.0)  # first of tied bests
    assert best_vs_worst(0, ["a", "b", "c"], [0.25, 0.25, 0.25]) is None
    assert best_vs_worst(0, ["a", "b"], [0.0, 0.0]) is None


def test_best_vs_each_orders_by_gap_and_drops_ties_with_the_best():
    responses = ["mid", "best", "worst", "tie", "low"]
    pairs = best_vs_each(0, responses, [6.0, 10.0, 1.0, 10.0, 3.0])
    assert [p.rejected for p in pairs] == ["worst", "low", "mid"]       # gaps 9, 7, 4: easiest first
    assert [p.gap for p in pairs] == [9.0, 7.0, 4.0]
    assert all(p.chosen == "best" for p in pairs)
    assert best_vs_each(0, ["a", "b"], [2.0, 2.0]) == []


def test_order_by_difficulty_is_stable():
    pairs = best_vs_each(0, ["a", "b", "c", "d"], [4.0, 3.0, 2.0, 1.0])
    reordered = order_by(pairs, [0.3, 0.1, 0.1])
    assert [p.rejected for p in reordered] == ["c", "b", "d"]


def test_curriculum_stages_take_the_kth_easiest_pair_of_every_prompt():
    first = best_vs_each(0, ["a", "b", "c", "d"], [4.0, 1.0, 2.0, 3.0])   # 3 pairs
    second = best_vs_each(1, ["x", "y"], [1.0, 0.0])                       # 1 pair
    stages = curriculum_stages([first, second])
    assert [[(p.prompt_index, p.rejected) for p in stage] for stage in stages] == [
        [(0, "b"), (1, "y")], [(0, "c")], [(0, "d")]]
    assert len(curriculum_stages([first, second], stages=2)) == 2
    ordered = easy_to_hard([first, second])
    assert [(p.prompt_index, p.gap) for p in ordered] == [(0, 3.0), (1, 1.0), (0, 2.0), (0, 1.0)]


def test_rows_keep_the_prompt_format():
    pair = best_vs_worst(0, ["good", "bad"], [1.0, 0.0])
    chat = as_row(pair, [{"role": "user", "content": "q"}])
    assert chat["chosen"] == [{"role": "assistant", "content": "good"}] and chat["rejected_score"] == 0.0
    assert as_row(pair, "q")["rejected"] == "bad"


def test_unshuffled_order_is_the_data_order_every_epoch():
    order = DataOrder(10, 3, seed=5, shuffle=False)
    assert [order.batch(k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    shuffled = DataOrder(10, 3, seed=5)
    assert [shuffled.batch(k) for k in range(3)] != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
