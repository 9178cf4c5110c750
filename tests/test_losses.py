"""Every loss in `align_cli.losses.LOSSES` against an independent float64 reference written from its formula.

The references below use only elementary torch ops (`log1p`, `exp`, `clamp`), none of the implementation's
helpers, so a slip in a shared helper cannot hide on both sides.
"""

from __future__ import annotations

import pytest
import torch
from align_cli.losses import LOSSES, TENSOR_INPUTS

B = 6


def logsig(z):
    # Stable for any z, so that saturated references stay finite.
    return torch.clamp(z, max=0) - torch.log1p(torch.exp(-z.abs()))


def random_inputs(names, seed, batch=B):
    """Fresh, never-zero float64 inputs.

    Policy log-probs lie in (-30.5, -0.5); each reference log-prob is its policy's plus noise in (-3, 3), so
    the log-ratios look like a policy near its reference. Lengths 1..40, probabilities in (0.05, 0.95).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(names, key=lambda n: n.startswith("ref_")):  # policies before references
        if name.endswith("_lengths"):
            tensors[name] = torch.randint(1, 41, (batch,), generator=generator)
        elif name.endswith("probability"):
            tensors[name] = 0.05 + 0.9 * torch.rand(batch, generator=generator, dtype=torch.float64)
        elif name.startswith("ref_"):
            noise = 6 * torch.rand(batch, generator=generator, dtype=torch.float64) - 3
            tensors[name] = tensors["policy_" + name[len("ref_") :]] + noise
        else:
            tensors[name] = -(0.5 + 30 * torch.rand(batch, generator=generator, dtype=torch.float64))
    return {name: tensors[name] for name in names}


def stable_seed(name, hyper):
    return sum(map(ord, name + repr(sorted(hyper.items()))))


# --- float64 references, straight from docs/ALGORITHMS.md / the papers -------------------------------------------


def margin(t):
    return (t["policy_chosen"] - t["ref_chosen"]) - (t["policy_rejected"] - t["ref_rejected"])


def ref_dpo(t, beta=0.1):
    return -logsig(beta * margin(t))


def ref_cdpo(t, beta=0.1, label_smoothing=0.1):
    z = beta * margin(t)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def ref_rdpo(t, beta=0.1, label_smoothing=0.1):
    z, eps = beta * margin(t), label_smoothing
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)


def ref_ipo(t, beta=0.1):
    chosen = (t["policy_chosen"] - t["ref_chosen"]) / t["chosen_lengths"]
    rejected = (t["policy_rejected"] - t["ref_rejected"]) / t["rejected_lengths"]
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def ref_hinge(t, beta=0.1):
    return torch.clamp(1 - beta * margin(t), min=0)


def ref_sft(t, normalize="batch_tokens"):
    if normalize == "per_sequence":  # the RPO paper: each example's NLL over its own length
        return -t["policy_chosen"] / t["chosen_lengths"]
    # Documented contract: per-example -logp * B / total tokens, so that the mean is the token-mean NLL.
    return -t["policy_chosen"] * len(t["policy_chosen"]) / t["chosen_lengths"].sum()


def f_prime(u, divergence, alpha):
    """The paper's f'(u), constants included (they cancel in the margin)."""
    if divergence == "reverse_kl":
        return torch.log(u) + 1
    if divergence == "forward_kl":
        return 1 - 1 / u
    if divergence == "js":
        return torch.log(2 * u / (1 + u))
    return (1 - u ** (-alpha)) / alpha


def ref_fdpo(t, beta=0.1, divergence="reverse_kl", alpha=0.5, max_exponent=80.0):
    u_chosen = torch.exp(t["policy_chosen"] - t["ref_chosen"])
    u_rejected = torch.exp(t["policy_rejected"] - t["ref_rejected"])
    return -logsig(beta * (f_prime(u_chosen, divergence, alpha) - f_prime(u_rejected, divergence, alpha)))


# TPO's gold NLL: per-example -logp * B / total gold tokens, so that the batch mean is the token mean.
def ref_tpo(t, beta=0.01, label_smoothing=0.0, alpha=1.0):
    z = beta * (t["policy_chosen"] - t["policy_rejected"])
    preference = -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
    return preference - alpha * t["policy_gold"] * len(z) / t["gold_lengths"].sum()


def ref_tpo_l(t, beta=0.01, gamma=0.5, label_smoothing=0.0, alpha=1.0):
    z = (
        beta * (t["policy_chosen"] / t["chosen_lengths"] - t["policy_rejected"] / t["rejected_lengths"])
        - gamma
    )
    preference = -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
    return preference - alpha * t["policy_gold"] * len(z) / t["gold_lengths"].sum()


def ref_srpo(t, beta=0.1, a=0.8):
    def hd(response, context):
        return t[f"policy_{response}_given_{context}"] - t[f"ref_{response}_given_{context}"]

    p = t.get("preference_probability", torch.ones_like(t["policy_chosen"]))
    h_w, h_l = t["policy_chosen"] - t["ref_chosen"], t["policy_rejected"] - t["ref_rejected"]
    self_loss = (p - 0.5 - beta * (hd("chosen", "rejected") - hd("rejected", "rejected"))) ** 2
    self_loss = self_loss + (p - 0.5 - beta * (hd("chosen", "chosen") - hd("rejected", "chosen"))) ** 2
    gen_loss = (beta * (hd("chosen", "rejected") + h_w - hd("rejected", "chosen") - h_l) - (2 * p - 1)) ** 2
    return a * self_loss + (1 - a) * gen_loss


def ref_sppo(t, beta=0.001):
    p_w = t.get("chosen_win_probability", torch.ones_like(t["policy_chosen"]))
    p_l = t.get("rejected_win_probability", torch.zeros_like(t["policy_chosen"]))
    h_w, h_l = t["policy_chosen"] - t["ref_chosen"], t["policy_rejected"] - t["ref_rejected"]
    return (h_w - (p_w - 0.5) / beta) ** 2 + (h_l - (p_l - 0.5) / beta) ** 2


PAIR = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
LENGTHS = ["chosen_lengths", "rejected_lengths"]
GOLD = ["policy_gold", "gold_lengths"]
SRPO_EXTRA = [n for n in TENSOR_INPUTS if "_given_" in n]

# (loss name, reference, tensor names, hyperparameters): defaults first, then non-default settings.
CASES = [
    ("dpo", ref_dpo, PAIR, {}),
    ("dpo", ref_dpo, PAIR, {"beta": 0.5}),
    ("cdpo", ref_cdpo, PAIR, {}),
    ("cdpo", ref_cdpo, PAIR, {"label_smoothing": 0.3, "beta": 0.2}),
    ("rdpo", ref_rdpo, PAIR, {}),
    ("rdpo", ref_rdpo, PAIR, {"label_smoothing": 0.25}),
    ("ipo", ref_ipo, PAIR + LENGTHS, {}),
    ("ipo", ref_ipo, PAIR + LENGTHS, {"beta": 0.5}),
    ("hinge", ref_hinge, PAIR, {}),
    ("hinge", ref_hinge, PAIR, {"beta": 1.0}),  # some margins past the hinge: zero loss and gradient
    ("sft", ref_sft, ["policy_chosen", "chosen_lengths"], {}),
    ("sft", ref_sft, ["policy_chosen", "chosen_lengths"], {"normalize": "per_sequence"}),
    ("fdpo", ref_fdpo, PAIR, {}),
    ("fdpo", ref_fdpo, PAIR, {"divergence": "forward_kl", "beta": 0.03}),
    ("fdpo", ref_fdpo, PAIR, {"divergence": "js"}),
    ("fdpo", ref_fdpo, PAIR, {"divergence": "alpha", "alpha": 0.3}),
    ("fdpo", ref_fdpo, PAIR, {"divergence": "alpha", "alpha": 0.8, "beta": 0.2}),
    ("tpo", ref_tpo, PAIR[:2] + GOLD, {}),
    ("tpo", ref_tpo, PAIR[:2] + GOLD, {"beta": 0.1, "label_smoothing": 0.2, "alpha": 0.05}),
    ("tpo_l", ref_tpo_l, PAIR[:2] + LENGTHS + GOLD, {}),
    ("tpo_l", ref_tpo_l, PAIR[:2] + LENGTHS + GOLD, {"beta": 2.0, "gamma": 1.5, "alpha": 0.5}),
    ("tpo_l", ref_tpo_l, PAIR[:2] + LENGTHS + GOLD, {"beta": 2.0, "gamma": 1.5, "label_smoothing": 0.2}),
    ("srpo", ref_srpo, PAIR + SRPO_EXTRA, {}),
    ("srpo", ref_srpo, PAIR + SRPO_EXTRA + ["preference_probability"], {"a": 0.3, "beta": 0.05}),
    ("sppo", ref_sppo, PAIR, {}),
    ("sppo", ref_sppo, PAIR + ["chosen_win_probability", "rejected_win_probability"], {"beta": 0.01}),
]
CASE_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


def leaves(tensors):
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}


def gradients(loss, tensors, weights):
    floats = [v for v in tensors.values() if v.is_floating_point()]
    return torch.autograd.grad((loss * weights).sum(), floats)


@pytest.mark.parametrize("name, reference, names, hyper", CASES, ids=CASE_IDS)
def test_loss_and_gradient_match_float64_reference(name, reference, names, hyper):
    tensors = random_inputs(names, seed=stable_seed(name, hyper))
    weights = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
    ours_inputs, ref_inputs = leaves(tensors), leaves(tensors)
    loss, metrics = LOSSES[name](**ours_inputs, **hyper)
    expected = reference(ref_inputs, **hyper)

    assert loss.shape == (B,) and loss.dtype == torch.float64
    assert expected.shape == (B,) and torch.isfinite(expected).all()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(gradients(loss, ours_inputs, weights), gradients(expected, ref_inputs, weights)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
        assert ours.abs().sum() > 0  # every float input must reach the loss

    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key

    # The float32 path (what the trainer passes) agrees with float64 to float32 precision.
    loss32, _ = LOSSES[name](
        **{k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, **hyper
    )
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), expected.detach(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name, reference, names, hyper", CASES, ids=CASE_IDS)
def test_gradcheck(name, reference, names, hyper):
    tensors = random_inputs(names, seed=11, batch=3)
    float_names = [k for k, v in tensors.items() if v.is_floating_point()]
    constants = {k: v for k, v in tensors.items() if not v.is_floating_point()}

    def loss_of(*floats):
        return LOSSES[name](**dict(zip(float_names, floats)), **constants, **hyper)[0]

    floats = tuple(tensors[k].clone().requires_grad_() for k in float_names)
    assert torch.autograd.gradcheck(loss_of, floats)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    tensors = {k: v.to(dtype) for k, v in random_inputs(PAIR, seed=3).items()}
    for name in ("dpo", "cdpo", "rdpo", "hinge", "fdpo", "sppo"):
        loss, metrics = LOSSES[name](**tensors)
        assert loss.dtype == torch.float32, name
        assert all(v.dtype == torch.float32 for v in metrics.values()), name


def test_dpo_metrics_values():
    t = random_inputs(PAIR, seed=5)
    _, metrics = LOSSES["dpo"](**t, beta=0.2)
    h_w, h_l = t["policy_chosen"] - t["ref_chosen"], t["policy_rejected"] - t["ref_rejected"]
    torch.testing.assert_close(metrics["rewards/chosen"], 0.2 * h_w.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], 0.2 * h_l.mean())
    torch.testing.assert_close(metrics["rewards/margins"], 0.2 * (h_w - h_l).mean())
    torch.testing.assert_close(metrics["rewards/accuracies"], (h_w > h_l).double().mean())
    torch.testing.assert_close(metrics["logps/chosen"], t["policy_chosen"].mean())
    torch.testing.assert_close(metrics["logps/rejected"], t["policy_rejected"].mean())
    assert 0 < metrics["rewards/accuracies"] < 1  # the random batch has both outcomes, so the check bites
