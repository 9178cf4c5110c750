"""alpaca_eval's metrics on hand-computed cases, and the length-controlled GLM's behaviour."""

import math

import numpy as np
import pytest

from align_cli.eval.length_control import length_controlled_winrate, length_features
from align_cli.eval.metrics import annotation_metrics, avg_length, discretise, win_rate_metrics


def test_hard_preferences_by_hand():
    # model wins 2, loses 1, draws 1 (as 1.5) and 1 (as the legacy 0): shifted values 1, 1, 0, .5, .5
    metrics = win_rate_metrics([2, 2, 1, 1.5, 0])
    assert metrics["win_rate"] == pytest.approx(60.0)
    # sample sd of (1, 1, 0, .5, .5): mean .6, squares .16+.16+.36+.01+.01 = .7, /4 = .175
    assert metrics["standard_error"] == pytest.approx(math.sqrt(0.175) / math.sqrt(5) * 100)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"], metrics["n_total"]) == (2, 1, 2, 5)
    assert metrics["discrete_win_rate"] == pytest.approx(60.0)


def test_soft_preferences_and_discrete_rounding():
    metrics = win_rate_metrics([1.9, 1.2, 1.6, 1.5])
    assert metrics["win_rate"] == pytest.approx((0.9 + 0.2 + 0.6 + 0.5) / 4 * 100)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"]) == (2, 1, 1)
    # rounded: 2, 1, 2, draw -> (1 + 0 + 1 + .5) / 4
    assert metrics["discrete_win_rate"] == pytest.approx(62.5)


def test_non_preferences_are_dropped_but_counted_as_draws_first():
    metrics = win_rate_metrics([2, None, float("nan"), 3.0, 1])
    assert metrics["n_total"] == 2 and metrics["win_rate"] == pytest.approx(50.0)
    assert metrics["n_draws"] == 0


def test_single_preference_has_no_standard_error():
    metrics = win_rate_metrics([2])
    assert metrics["win_rate"] == 100.0 and math.isnan(metrics["standard_error"])


def test_discretise_follows_the_zero_one_rule():
    # 1.5 stays a draw; 2.5 rounds half-to-even to 2; 0.4 rounds to 0, which reads as a draw
    assert discretise(np.array([1.5, 1.49, 1.51, 2.5, 0.4])).tolist() == [1.5, 1.0, 2.0, 2.0, 1.5]


def test_avg_length_truncates():
    assert avg_length(["ab", "abcd", "abcde"]) == 3  # 11 / 3 = 3.67


def test_length_features_scale_by_sample_std():
    features = length_features(["aaaa", "aa", "aaaaaa"], ["a", "a", "a"])  # deltas 3, 1, 5: std 2
    assert features.tolist() == pytest.approx(np.tanh(np.array([1.5, 0.5, 2.5])).tolist())
    assert length_features(["aa", "bb"], ["c", "d"]).tolist() == [0.0, 0.0]  # no spread: no length signal


def _lengths(count, rng):
    return ["x" * int(n) for n in rng.integers(20, 200, size=count)]


def test_lc_without_length_effect_is_close_to_the_win_rate():
    rng = np.random.default_rng(0)
    reference, model = _lengths(80, rng), _lengths(80, rng)
    preferences = 1 + rng.choice([0.0, 1.0], size=80, p=[0.3, 0.7])
    lc = length_controlled_winrate(preferences, reference, model)
    raw = win_rate_metrics(preferences)["win_rate"]
    assert abs(lc["length_controlled_winrate"] - raw) < 5
    assert lc["lc_glm"] == "length_controlled_minimal"
    assert lc["lc_standard_error"] == pytest.approx(0.0, abs=1e-9)  # one prediction for every instruction


def test_lc_discounts_wins_bought_with_length():
    rng = np.random.default_rng(1)
    reference = ["x" * 100] * 60
    model = ["y" * int(n) for n in rng.integers(20, 400, size=60)]
    # a length-loving judge: the longer output wins, whatever it says
    preferences = np.array([2.0 if len(m) > 100 else 1.0 for m in model])
    lc = length_controlled_winrate(preferences, reference, model)
    assert lc["length_controlled_winrate"] < win_rate_metrics(preferences)["win_rate"] - 10
    assert lc["lc_weights"]["np.tanh(std_delta_len)"] < 0  # reference longer -> the model loses


def test_lc_uses_difficulty_when_given():
    rng = np.random.default_rng(2)
    reference, model = _lengths(40, rng), _lengths(40, rng)
    difficulty = rng.normal(size=40)
    preferences = np.where(difficulty > 0, 1.0, 2.0)  # hard instructions are lost
    lc = length_controlled_winrate(preferences, reference, model, difficulty=difficulty)
    assert lc["lc_glm"] == "length_controlled_noreg" and lc["lc_weights"]["instruction_difficulty"] < 0
    assert lc["lc_standard_error"] > 0


def test_lc_edge_cases():
    assert length_controlled_winrate(np.array([2.0, 1.0, 2.0]), ["a"] * 3, ["bb"] * 3)["length_controlled_winrate"] is None
    same = length_controlled_winrate(np.array([2.0, 1.0] * 5), ["a"] * 10, ["b"] * 10, same_generator=True)
    assert same["length_controlled_winrate"] == 50.0


def test_annotation_metrics_combines_everything():
    rows = [{"instruction": f"i{k}", "output_1": "r" * 10, "output_2": "m" * (5 + k), "generator_1": "ref",
             "generator_2": "model", "preference": p} for k, p in enumerate([2, 1, 2, 1.5, 2, 1])]
    metrics = annotation_metrics(rows)
    assert metrics["win_rate"] == pytest.approx(100 * 3.5 / 6)
    assert metrics["avg_length"] == 7  # (5+6+7+8+9+10)/6 = 7.5
    assert metrics["length_controlled_winrate"] is not None
    # without the output texts only the win rates can be computed
    bare = annotation_metrics([{"preference": p} for p in [2, 1, 2]])
    assert bare["length_controlled_winrate"] is None and bare["n_total"] == 3


def test_parity_with_alpaca_eval_when_installed():
    """Same numbers as alpaca_eval's own functions (skipped unless alpaca_eval is importable)."""
    metrics_module = pytest.importorskip("alpaca_eval.metrics")
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    import pandas as pd

    rng = np.random.default_rng(3)
    reference, model = _lengths(50, rng), _lengths(50, rng)
    preferences = np.clip(1 + rng.random(50) + 0.2 * (np.array([len(m) for m in model]) > 110), 1, 2)
    preferences[[4, 9]] = [1.5, 0.0]
    ours = win_rate_metrics(preferences)
    theirs = metrics_module.get_winrate([{"preference": p} for p in preferences])
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), rel=1e-12), key

    frame = pd.DataFrame({"output_1": reference, "output_2": model, "preference": preferences}).reset_index()
    delta = frame["output_1"].str.len() - frame["output_2"].str.len()
    features = pd.DataFrame({"preference": frame["preference"].replace({0.0: 1.5}) - 1,
                             "std_delta_len": delta / delta.std(), "not_gamed_baseline": True})
    test = features[["not_gamed_baseline"]].assign(std_delta_len=0)
    formula = glm.GLM_INFO["length_controlled_minimal"]["formula"]
    train, test = glm.make_dmatrix_for_model(features, test, formula=formula)
    fitted = glm.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=5)
    expected = fitted.predict_proba(test)[:, 1].mean() * 100
    assert length_controlled_winrate(preferences, reference, model)["length_controlled_winrate"] == pytest.approx(expected, rel=1e-9)
