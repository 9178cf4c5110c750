"""Length-controlled win rate: alpaca_eval's GLM (`metrics/glm_winrate.py`), fitted on one model's
annotations.

The GLM predicts the preference p = preference - 1 (in [0, 1], draws 0.5) from features without
an intercept:
    logit p = w_len * tanh((len(output_1) - len(output_2)) / std) [+ w_diff * difficulty] + w_model
fitted by L1 logistic regression (liblinear, C chosen from 10 values by 5-fold cross-validation
grouped by instruction, with soft targets: each row is duplicated as a y=1 row weighted p and a y=0
row weighted 1 - p). The length-controlled win rate is the mean prediction with the length
difference set to zero, x 100; `lc_standard_error` is the standard error of those per-instruction
predictions, x 100.

What differs from AlpacaEval 2's published `length_controlled_v1`: that GLM also regularises towards
two "gamed" baselines (concise and verbose variants of the reference, `df_gamed.csv`) and takes each
instruction's difficulty from a file; both come from the hub at run time. Here:
- with a difficulty file (`instruction, instruction_difficulty`), the GLM is alpaca_eval's
  `length_controlled_noreg` (difficulty term, no regularisation to the gamed baselines);
- without one, it is `length_controlled_minimal` (length and model terms only). The prediction is
  then one number for every instruction, so `lc_standard_error` is 0 by construction: use
  `standard_error` of the raw win rate as the uncertainty in that case.
Fewer than 5 judged instructions (one per cross-validation fold) give no LC numbers (None).
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

N_SPLITS = 5
LENGTH = "np.tanh(std_delta_len)"
DIFFICULTY = "instruction_difficulty"
MODEL = "not_gamed_baseline.astype(float)"  # alpaca_eval's column names, so weights read the same


def length_features(reference_outputs: list[str], model_outputs: list[str]) -> np.ndarray:
    """tanh of the length difference (reference minus model) over its sample std (ddof=1)."""
    delta = np.array([len(a) - len(b) for a, b in zip(reference_outputs, model_outputs)], dtype=np.float64)
    scale = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
    # alpaca_eval divides by the std unguarded; equal lengths everywhere carry no length signal
    return np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)


def _logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
    """Log loss against soft targets: sklearn passes the duplicated 0/1 rows, `true_prob` restores p."""
    target = np.where(np.asarray(y_true) == 1, true_prob, 1 - np.asarray(true_prob))
    y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
    losses = target * np.log(y_pred) + (1 - target) * np.log(1 - y_pred)
    if true_sample_weight is not None:
        losses = losses * true_sample_weight
    return -np.mean(losses)


def _l1_kwargs(estimator) -> dict:
    # sklearn 1.8 replaced `penalty` with `l1_ratios`; both spell a pure L1 penalty.
    if "l1_ratios" in inspect.signature(estimator).parameters:
        return {"l1_ratios": (1.0,), "use_legacy_attributes": False}
    return {"penalty": "l1"}


def fit_soft_logistic(features: np.ndarray, targets: np.ndarray):
    """alpaca_eval's `fit_LogisticRegressionCV` with probability targets, no sample weights."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    rows = len(targets)
    duplicated = np.concatenate([features, features])
    labels = np.concatenate([np.ones(rows), np.zeros(rows)])
    true_prob = np.concatenate([targets, 1 - targets])
    groups = np.concatenate([np.arange(rows), np.arange(rows)])
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear convergence chatter on tiny folds
        scorer = make_scorer(_logloss_continuous, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=N_SPLITS), scoring=scorer, random_state=123, dual=False,
                                     solver="liblinear", n_jobs=None, fit_intercept=False,
                                     **_l1_kwargs(LogisticRegressionCV))
        model.set_fit_request(sample_weight=True)
        model.fit(duplicated, labels, sample_weight=true_prob, groups=groups, true_sample_weight=None,
                  true_prob=true_prob)
    return model


def length_controlled_winrate(preferences: np.ndarray, reference_outputs: list[str], model_outputs: list[str],
                              difficulty: np.ndarray | None = None, same_generator: bool = False) -> dict:
    """`length_controlled_winrate`, `lc_standard_error` and the GLM's name and weights.

    `preferences` are on alpaca_eval's 1..2 scale (NaN for no judgment); `difficulty` is one value per
    row or None. `same_generator` (the model is its own reference) gives 50% by construction."""
    preferences = np.where(preferences == 0, 1.5, preferences)
    columns = [LENGTH] + ([DIFFICULTY] if difficulty is not None else []) + [MODEL]
    glm = "length_controlled_noreg" if difficulty is not None else "length_controlled_minimal"
    if same_generator:
        predicted = np.full(len(preferences), 0.5)
        weights = {name: 0.0 for name in columns}
    else:
        known = ~np.isnan(preferences)
        if int(known.sum()) < N_SPLITS:
            return {"length_controlled_winrate": None, "lc_standard_error": None, "lc_glm": glm}
        design = [length_features(reference_outputs, model_outputs)]
        if difficulty is not None:
            design.append(np.asarray(difficulty, dtype=np.float64))
        design.append(np.ones(len(preferences)))
        train = np.stack(design, axis=1)
        test = train.copy()
        test[:, 0] = 0.0  # tanh(0): what the judge would prefer if both outputs had the same length
        model = fit_soft_logistic(train[known], preferences[known] - 1)
        predicted = model.predict_proba(test)[:, 1]
        weights = {name: float(value) for name, value in zip(columns, np.ravel(model.coef_))}
    sem = float(np.std(predicted, ddof=1) / math.sqrt(len(predicted))) if len(predicted) > 1 else math.nan
    return {"length_controlled_winrate": float(np.mean(predicted) * 100), "lc_standard_error": sem * 100,
            "lc_glm": glm, "lc_weights": weights}
