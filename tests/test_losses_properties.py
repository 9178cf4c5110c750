"""Properties of the losses beyond their formulas: registry contract, limits, edge cases, clamping."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from align_cli.losses import LOSSES, TENSOR_INPUTS, hyperparameters, needs_reference, tensor_inputs

PAIR = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def pair_inputs(seed, batch=8, spread=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    policy = -(0.5 + 30 * torch.rand(2, batch, generator=generator, dtype=dtype))
    ref = policy + spread * (2 * torch.rand(2, batch, generator=generator, dtype=dtype) - 1)
    return dict(zip(PAIR, (policy[0], policy[1], ref[0], ref[1])))


def test_registry_contents():
    assert set(LOSSES) == {
        "dpo",
        "cdpo",
        "rdpo",
        "ipo",
        "hinge",
        "sft",
        "fdpo",
        "tpo",
        "tpo_l",
        "srpo",
        "sppo",
        "grpo",
        "dapo",
        "gspo",
        "hapo",
    }


def test_every_loss_follows_the_calling_convention():
    for name, function in LOSSES.items():
        assert re.search(r"et al\.|Mitchell", doc := function.__doc__ or ""), (
            f"{name}: docstring cites no paper"
        )
        assert re.search(r"20[12]\d", doc) and "`" in doc, f"{name}: docstring needs the year and the formula"
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                assert parameter.default is not inspect.Parameter.empty, f"{name}.{parameter.name}"
                assert parameter.name not in TENSOR_INPUTS, f"{name}.{parameter.name}"
            else:
                assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{name}.{parameter.name}"
                assert parameter.name in TENSOR_INPUTS, f"{name}: '{parameter.name}' is not a tensor input"


@pytest.mark.parametrize("name, params", [(n, {}) for n in ("dpo", "cdpo", "rdpo", "hinge", "ipo", "sppo")]
                         + [("fdpo", {"divergence": d}) for d in ("reverse_kl", "forward_kl", "js", "alpha")])
def test_reference_margin_only_is_declared_exactly_when_a_shift_leaves_the_loss_unchanged(name, params):
    """A per-prompt shift c of the reference (ref_chosen + c, ref_rejected + c) changes no loss that declares
    `reference_margin_only`, and changes every other pairwise loss with a reference (APO relies on both)."""
    from align_cli.losses import reference_margin_only

    inputs = pair_inputs(5)
    # Unequal lengths: IPO's length-normalised margin cancels a shift only when both answers have one length.
    lengths = {"chosen_lengths": torch.full((8,), 7.0, dtype=torch.float64),
               "rejected_lengths": torch.full((8,), 11.0, dtype=torch.float64)}
    shift = torch.linspace(-4.0, 4.0, 8, dtype=torch.float64)
    shifted = {**inputs, "ref_chosen": inputs["ref_chosen"] + shift, "ref_rejected": inputs["ref_rejected"] + shift}
    function = LOSSES[name]
    extra = {k: v for k, v in lengths.items() if k in tensor_inputs(function)}
    if "chosen_win_probability" in tensor_inputs(function):
        extra["chosen_win_probability"] = torch.ones(8, dtype=torch.float64)
    before, _ = function(**inputs, **extra, **params)
    after, _ = function(**shifted, **extra, **params)
    assert torch.allclose(before, after, atol=1e-10) == reference_margin_only(function, params)


def test_tensor_inputs_and_needs_reference():
    required_pair = dict.fromkeys(PAIR, True)
    assert tensor_inputs(LOSSES["dpo"]) == required_pair
    assert tensor_inputs(LOSSES["ipo"]) == {**required_pair, "chosen_lengths": True, "rejected_lengths": True}
    assert tensor_inputs(LOSSES["sft"]) == {"policy_chosen": True, "chosen_lengths": True}
    assert tensor_inputs(LOSSES["tpo"]) == {
        "policy_chosen": True,
        "policy_rejected": True,
        "policy_gold": False,
        "gold_lengths": False,
    }
    assert tensor_inputs(LOSSES["sppo"]) == {
        **required_pair,
        "chosen_win_probability": False,
        "rejected_win_probability": False,
    }
    srpo_inputs = tensor_inputs(LOSSES["srpo"])
    assert len(srpo_inputs) == 13 and srpo_inputs.pop("preference_probability") is False
    assert all(srpo_inputs.values())
    assert {n for n in LOSSES if not needs_reference(LOSSES[n])} == {"tpo", "tpo_l", "sft"}
    assert hyperparameters(LOSSES["fdpo"]) == {
        "beta": 0.1,
        "divergence": "reverse_kl",
        "alpha": 0.5,
        "max_exponent": 80.0,
    }
    assert hyperparameters(LOSSES["tpo"]) == {"beta": 0.01, "label_smoothing": 0.0, "alpha": 1.0}
    assert hyperparameters(LOSSES["srpo"]) == {"beta": 0.1, "a": 0.8}


# --- DPO family ---------------------------------------------------------------------------------------------


def test_rdpo_and_cdpo_differ_in_the_sign_of_the_flipped_term():
    t, eps, beta = pair_inputs(1), 0.2, 0.3
    z = beta * ((t["policy_chosen"] - t["ref_chosen"]) - (t["policy_rejected"] - t["ref_rejected"]))
    robust = LOSSES["rdpo"](**t, beta=beta, label_smoothing=eps)[0]
    conservative = LOSSES["cdpo"](**t, beta=beta, label_smoothing=eps)[0]
    # (1-2eps) * rdpo - cdpo = 2 eps logsig(-z): the flipped-label term enters with opposite signs.
    expected = 2 * eps * torch.nn.functional.logsigmoid(-z)
    torch.testing.assert_close((1 - 2 * eps) * robust - conservative, expected)


def test_rdpo_is_unbiased_under_label_flips_and_cdpo_is_not():
    t, eps = pair_inputs(2), 0.25
    flipped = {
        "policy_chosen": t["policy_rejected"],
        "policy_rejected": t["policy_chosen"],
        "ref_chosen": t["ref_rejected"],
        "ref_rejected": t["ref_chosen"],
    }
    clean = LOSSES["dpo"](**t)[0]
    for name, unbiased in (("rdpo", True), ("cdpo", False)):
        expected_over_flips = (1 - eps) * LOSSES[name](**t, label_smoothing=eps)[0] + eps * LOSSES[name](
            **flipped, label_smoothing=eps
        )[0]
        assert torch.allclose(expected_over_flips, clean) is unbiased, name


def test_smoothing_zero_is_dpo():
    t = pair_inputs(3)
    for name in ("cdpo", "rdpo"):
        torch.testing.assert_close(LOSSES[name](**t, label_smoothing=0.0)[0], LOSSES["dpo"](**t)[0])


@pytest.mark.parametrize("name, eps", [("rdpo", 0.5), ("rdpo", -0.1), ("cdpo", 0.7)])
def test_smoothing_out_of_range_is_rejected(name, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        LOSSES[name](**pair_inputs(4), label_smoothing=eps)


def test_sft_batch_mean_is_the_token_mean():
    logps = torch.tensor([-3.0, -10.0, -0.5], dtype=torch.float64)
    lengths = torch.tensor([2, 7, 1])
    loss, metrics = LOSSES["sft"](logps, lengths)
    torch.testing.assert_close(loss.mean(), torch.tensor(13.5 / 10, dtype=torch.float64))
    torch.testing.assert_close(metrics["nll/chosen"], torch.tensor(1.35, dtype=torch.float64))


def test_sft_per_sequence_is_the_mean_of_length_normalised_nlls():
    """RPO's NLL: (3/2 + 10/7 + 0.5/1) / 3, not the token mean 13.5/10 (a long answer does not dominate)."""
    logps = torch.tensor([-3.0, -10.0, -0.5], dtype=torch.float64)
    lengths = torch.tensor([2, 7, 1])
    loss, _ = LOSSES["sft"](logps, lengths, normalize="per_sequence")
    torch.testing.assert_close(loss.mean(), torch.tensor((1.5 + 10 / 7 + 0.5) / 3, dtype=torch.float64))
    same_lengths = torch.tensor([4, 4, 4])
    torch.testing.assert_close(LOSSES["sft"](logps, same_lengths, normalize="per_sequence")[0].mean(),
                               LOSSES["sft"](logps, same_lengths)[0].mean())
    with pytest.raises(ValueError, match="normalize"):
        LOSSES["sft"](logps, lengths, normalize="tokens")


def test_losses_combine_by_weights_into_rpo():
    """`sum_i w_i * mean(loss_i)` with dpo and sft is RPO: DPO plus a weighted token-mean NLL."""
    t = pair_inputs(5)
    lengths = torch.randint(1, 30, (8,), generator=torch.Generator().manual_seed(0))
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    combined = (
        1.0 * LOSSES["dpo"](**leaves, beta=0.2)[0].mean()
        + 0.7 * LOSSES["sft"](leaves["policy_chosen"], lengths)[0].mean()
    )
    reference_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    r = reference_leaves
    margin = (r["policy_chosen"] - r["ref_chosen"]) - (r["policy_rejected"] - r["ref_rejected"])
    reference = torch.log1p(torch.exp(-0.2 * margin)).mean() + 0.7 * (
        -r["policy_chosen"].sum() / lengths.sum()
    )
    torch.testing.assert_close(combined, reference)
    ours = torch.autograd.grad(combined, list(leaves.values()))
    theirs = torch.autograd.grad(reference, list(reference_leaves.values()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


# --- f-DPO --------------------------------------------------------------------------------------------------


def test_fdpo_reverse_kl_is_dpo_and_alpha_limits():
    t = pair_inputs(6)
    dpo = LOSSES["dpo"](**t)[0]
    torch.testing.assert_close(LOSSES["fdpo"](**t)[0], dpo)
    # alpha -> 0 tends to reverse KL, alpha -> 1 to forward KL (paper convention).
    torch.testing.assert_close(
        LOSSES["fdpo"](**t, divergence="alpha", alpha=1e-7)[0], dpo, rtol=1e-5, atol=1e-6
    )
    forward = LOSSES["fdpo"](**t, divergence="forward_kl")[0]
    near_one = LOSSES["fdpo"](**t, divergence="alpha", alpha=1 - 1e-7)[0]
    torch.testing.assert_close(near_one, forward, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "alpha", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fdpo_stays_finite_for_huge_log_ratios(divergence, dtype):
    magnitudes = torch.tensor([1e4, -1e4, 3e3, -3e3, 200.0, -200.0, 1.0, -90.0])
    t = {
        "policy_chosen": (-5 + magnitudes).to(dtype).requires_grad_(),
        "policy_rejected": (-5 - magnitudes.flip(0)).to(dtype).requires_grad_(),
        "ref_chosen": torch.full((8,), -5.0, dtype=dtype),
        "ref_rejected": torch.full((8,), -5.0, dtype=dtype),
    }
    loss, metrics = LOSSES["fdpo"](**t, divergence=divergence, beta=0.1)
    grads = torch.autograd.grad(loss.sum(), [t["policy_chosen"], t["policy_rejected"]])
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("divergence, alpha", [("forward_kl", 1.0), ("alpha", 0.5)])
def test_fdpo_beyond_the_cap_the_slope_is_capped_not_the_value(divergence, alpha):
    """Beyond `max_exponent` psi follows its tangent: continuous value, slope exp(cap), still a gradient."""
    max_exponent, beta = 11.0, 0.1
    kwargs = {"divergence": divergence, "alpha": alpha, "max_exponent": max_exponent, "beta": beta}
    others = {"policy_rejected": torch.tensor([-3.0]), "ref_chosen": torch.tensor([0.0]),
              "ref_rejected": torch.tensor([-2.0])}  # h_l = -1
    h_at_cap = -max_exponent / alpha

    def loss_and_slope(h):
        chosen = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        loss = LOSSES["fdpo"](chosen, **{k: v.double() for k, v in others.items()}, **kwargs)[0]
        return loss.item(), torch.autograd.grad(loss.sum(), chosen)[0].item()

    def psi_l():
        return -math.exp(alpha * 1.0) / alpha

    # At the cap: the exact formula. 1e4 beyond it: the tangent, -exp(cap) * (1 + e - cap) / alpha.
    for h in (h_at_cap, -1e4):
        exponent = -alpha * h
        psi_w = -math.exp(min(exponent, max_exponent)) * (1 + max(exponent - max_exponent, 0.0)) / alpha
        z = beta * (psi_w - psi_l())
        loss, slope = loss_and_slope(h)
        assert loss == pytest.approx(-z + math.log1p(math.exp(z)), rel=1e-12)
        # d loss / d h_w = -sigmoid(-z) * beta * psi'(h_w), psi' = exp(min(exponent, cap)).
        assert slope == pytest.approx(-beta * math.exp(min(exponent, max_exponent)) / (1 + math.exp(z)), rel=1e-9)
        assert slope < 0, "a chosen answer far below the reference is still pushed up"
    assert loss_and_slope(h_at_cap - 1e-6)[1] == pytest.approx(loss_and_slope(h_at_cap + 1e-6)[1], rel=1e-5)
    # Far enough out for the tangent itself to overflow float32, the value stops growing and stays finite.
    beyond = {"policy_chosen": torch.tensor([-1e30], requires_grad=True)} | others
    loss = LOSSES["fdpo"](**beyond, **kwargs)[0]
    assert torch.isfinite(loss).all() and torch.isfinite(torch.autograd.grad(loss.sum(), beyond["policy_chosen"])[0])


def fdpo_reference(h_w, h_l, beta, divergence, alpha):
    """float64, straight from the paper's f'(u) with u = exp(h) (constants included: they cancel)."""
    def f_prime(h):
        u = torch.exp(h)
        return {"forward_kl": 1 - 1 / u, "js": torch.log(2 * u / (1 + u)), "reverse_kl": torch.log(u) + 1,
                "alpha": (1 - u ** (-alpha)) / alpha}[divergence]

    return torch.nn.functional.softplus(-beta * (f_prime(h_w) - f_prime(h_l)))


@pytest.mark.parametrize("divergence, alpha", [("forward_kl", 0.5), ("js", 0.5), ("reverse_kl", 0.5),
                                               ("alpha", 0.3), ("alpha", 0.9)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fdpo_low_precision_gradients_are_finite_and_values_exact_inside_the_cap(divergence, dtype, alpha):
    """|h| up to 90 on either side, fp16/bf16 inputs: every gradient finite in the input dtype (before the cap
    was chosen per dtype, fp16 gradients were beta * e^k > 65504, i.e. inf, for 11 < k <= 80)."""
    beta = 0.1
    h = torch.tensor([-90.0, -79.0, -40.0, -20.0, -12.0, -8.0, -1.0, 0.0, 1.0, 8.0, 20.0, 90.0])
    rejected_h = torch.tensor([90.0, -90.0, 3.0, -2.0, 12.0, -12.0, 0.5, -6.0, 40.0, -79.0, -8.0, 1.0])
    tensors = {"policy_chosen": (h - 4).to(dtype), "policy_rejected": (rejected_h - 4).to(dtype),
               "ref_chosen": torch.full_like(h, -4.0).to(dtype), "ref_rejected": torch.full_like(h, -4.0).to(dtype)}
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    loss, _ = LOSSES["fdpo"](**leaves, divergence=divergence, alpha=alpha, beta=beta)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    assert torch.isfinite(loss).all()
    for grad in grads:
        assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert grads[0][0] < 0, "h_w = -90 (beyond the cap) still gets a gradient that raises it"

    # Inside the cap (every exponent below it) the values are the float64 formula of the rounded inputs.
    cap = math.log(torch.finfo(dtype).max / (2 * beta)) if dtype == torch.float16 else 80.0
    h_w = (tensors["policy_chosen"].double() - tensors["ref_chosen"].double())
    h_l = (tensors["policy_rejected"].double() - tensors["ref_rejected"].double())
    exponential = divergence in ("forward_kl", "alpha")
    scale = alpha if divergence == "alpha" else 1.0
    inside = -scale * torch.minimum(h_w, h_l) < cap if exponential else torch.ones_like(h_w, dtype=torch.bool)
    assert inside.sum() >= 6 and (~inside).sum() >= (2 if exponential and dtype == torch.float16 else 0)
    expected = fdpo_reference(h_w, h_l, beta, divergence, alpha)
    torch.testing.assert_close(loss.double()[inside], expected[inside], rtol=1e-5, atol=1e-6)  # float32 compute


def test_fdpo_rejects_bad_settings():
    with pytest.raises(ValueError, match="divergence"):
        LOSSES["fdpo"](**pair_inputs(7), divergence="hellinger")
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            LOSSES["fdpo"](**pair_inputs(7), divergence="alpha", alpha=alpha)


# --- TPO, SRPO, SPPO ----------------------------------------------------------------------------------------


def test_tpo_gold_nll_is_the_token_mean_and_optional():
    t = pair_inputs(8)
    pair = {"policy_chosen": t["policy_chosen"], "policy_rejected": t["policy_rejected"]}
    gold = {"policy_gold": t["ref_chosen"], "gold_lengths": torch.arange(1, 9)}
    without, metrics_without = LOSSES["tpo"](**pair)
    assert "nll/gold" not in metrics_without
    skipped, _ = LOSSES["tpo"](**pair, **gold, alpha=0.0)
    torch.testing.assert_close(skipped, without)
    with_gold, metrics = LOSSES["tpo"](**pair, **gold, alpha=0.5)
    token_mean = -gold["policy_gold"].sum() / 36
    torch.testing.assert_close(metrics["nll/gold"], token_mean)
    torch.testing.assert_close(with_gold.mean(), without.mean() + 0.5 * token_mean)
    with pytest.raises(ValueError, match="gold_lengths"):
        LOSSES["tpo"](**pair, policy_gold=gold["policy_gold"])
    lengths = {"chosen_lengths": torch.arange(2, 10), "rejected_lengths": torch.arange(3, 11)}
    _, tpo_l_metrics = LOSSES["tpo_l"](**pair, **lengths, **gold)
    torch.testing.assert_close(tpo_l_metrics["nll/gold"], token_mean)


def test_tpo_l_gamma_is_a_margin_inside_the_sigmoid():
    # Equal per-token log-probs: the loss is -logsig(-gamma) whatever beta.
    pair = {
        "policy_chosen": torch.tensor([-6.0]),
        "policy_rejected": torch.tensor([-12.0]),
        "chosen_lengths": torch.tensor([3]),
        "rejected_lengths": torch.tensor([6]),
    }
    loss, _ = LOSSES["tpo_l"](**pair, beta=5.0, gamma=1.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(1.3)), rel=1e-6)


def test_soft_labels_at_certainty_equal_hard_labels():
    t = pair_inputs(9)
    ones, zeros = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    hard = LOSSES["sppo"](**t)[0]
    torch.testing.assert_close(
        LOSSES["sppo"](**t, chosen_win_probability=ones, rejected_win_probability=zeros)[0], hard
    )
    extra = {
        n: t["policy_chosen"] - 0.1 * i for i, n in enumerate(n for n in TENSOR_INPUTS if "_given_" in n)
    }
    srpo_hard = LOSSES["srpo"](**t, **extra)[0]
    torch.testing.assert_close(LOSSES["srpo"](**t, **extra, preference_probability=ones)[0], srpo_hard)
    # No preference (P = 1/2): the targets vanish, so the loss is zero exactly when every margin is.
    equal = {k: torch.zeros(8, dtype=torch.float64) for k in list(t) + list(extra)}
    assert LOSSES["srpo"](**equal, preference_probability=ones / 2)[0].abs().max() == 0


def test_sppo_hard_matches_trl_sppo_hard_formula():
    """TRL 1.16 `loss_type="sppo_hard"` (trl/trainer/dpo_trainer.py):
    `(h_w - 0.5/beta)^2 + (h_l + 0.5/beta)^2`."""
    t, beta = pair_inputs(10), 0.01
    h_w, h_l = t["policy_chosen"] - t["ref_chosen"], t["policy_rejected"] - t["ref_rejected"]
    torch.testing.assert_close(
        LOSSES["sppo"](**t, beta=beta)[0], (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2
    )


def test_srpo_rejects_weight_outside_unit_interval():
    t = pair_inputs(11)
    extra = {n: t["policy_chosen"] for n in TENSOR_INPUTS if "_given_" in n}
    with pytest.raises(ValueError, match="self-improvement weight"):
        LOSSES["srpo"](**t, **extra, a=1.2)


def test_one_list_of_inputs_names_every_group_column_and_label():
    """The data side is derived from losses' lists: the tokenised groups, the columns a recipe may rename
    (each a `data.columns` key), and the RL losses (those taking per-token log-probs)."""
    from align_cli.losses import LABEL_INPUTS, RL_LOSSES, SEQUENCE_GROUPS, TOKEN_INPUTS

    from align_cli.config import ColumnMap
    from align_cli.data.batching import GROUP_COLUMNS
    from align_cli.data.preference import PAIR_COLUMNS

    assert list(GROUP_COLUMNS) == list(SEQUENCE_GROUPS)
    assert GROUP_COLUMNS["rejected_given_chosen"] == ("revision_prompt_chosen_ids", "rejected_ids")
    assert set(PAIR_COLUMNS) <= set(ColumnMap.model_fields) and set(LABEL_INPUTS) <= set(PAIR_COLUMNS)
    assert RL_LOSSES == ("grpo", "dapo", "gspo", "hapo")
    for name, function in LOSSES.items():
        for tensor in tensor_inputs(function):
            group = tensor.removeprefix("policy_").removeprefix("ref_").removesuffix("_lengths")
            assert group in SEQUENCE_GROUPS or tensor in LABEL_INPUTS + TOKEN_INPUTS, (name, tensor)


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "hapo"])
def test_rl_losses_use_the_reference_only_for_a_kl_term(name):
    from align_cli.losses import used_inputs

    function = LOSSES[name]
    assert "ref_token_logps" not in used_inputs(function, {**hyperparameters(function), "kl_beta": 0.0})
    assert "ref_token_logps" in used_inputs(function, {**hyperparameters(function), "kl_beta": 0.1})
    assert {"loss_mask", "loss_normaliser"} <= set(used_inputs(function, hyperparameters(function)))
