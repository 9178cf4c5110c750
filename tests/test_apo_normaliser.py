"""APO's extrapolated anchor and its normaliser log Z(x) (issue 15, item 3).

`log pi_{t+1} = (1+a) log pihat_{t+1} - a log pihat_t - log Z(x)`. On a toy categorical policy over a few
responses the exact log Z is a finite sum: the sample estimate converges to it, SPPO's gradient with the
unnormalised anchor is wrong while DPO's is not, and subtracting log Z (exact) gives the exact gradient. Then
the trainer's anchor on two real tiny checkpoints against a float64 computation by hand.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from align_cli.losses import LOSSES
from iterative_fixtures import completion_logp, prompt_rows, reward_model_dir, write_jsonl  # noqa: F401

from align_cli.config import LossTerm
from align_cli.errors import UserError
from align_cli.iterative.apo import require_estimable_normaliser
from align_cli.iterative.extrapolation import (
    AnchorLogps,
    NormaliserSamples,
    log_normaliser_estimate,
    needs_normalised_anchor,
)
from align_cli.recipe import load_recipe

ALPHA = 0.5


def toy_policies(responses=6, seed=0):
    """log pihat_{t+1}, log pihat_t over a finite set of responses of one prompt (float64)."""
    generator = torch.Generator().manual_seed(seed)
    current = torch.log_softmax(2 * torch.randn(responses, generator=generator, dtype=torch.float64), dim=0)
    previous = torch.log_softmax(2 * torch.randn(responses, generator=generator, dtype=torch.float64), dim=0)
    return current, previous


def exact_log_z(current, previous, alpha=ALPHA):
    return torch.logsumexp((1 + alpha) * current - alpha * previous, dim=0)


def test_estimate_converges_to_the_exact_log_normaliser():
    current, previous = toy_policies()
    exact = exact_log_z(current, previous)
    assert abs(float(exact)) > 0.1, "the toy's normaliser is far from 1, so an unnormalised anchor is visibly off"
    anchor = (1 + ALPHA) * current - ALPHA * previous
    generator = torch.Generator().manual_seed(1)
    errors = []
    for samples in (30, 3_000, 300_000):
        draws = torch.multinomial(current.exp(), samples, replacement=True, generator=generator)
        errors.append(abs(float(log_normaliser_estimate(anchor[draws], current[draws]) - exact)))
    assert errors[-1] < 0.01 and errors[-1] < errors[0]
    # Self-normalised importance weights of draws from pihat_{t+1} reweight them to the extrapolated policy.
    draws = torch.multinomial(current.exp(), 300_000, replacement=True, generator=generator)
    weights = torch.softmax(anchor[draws] - current[draws], dim=0)
    reweighted = torch.zeros_like(current).index_add(0, draws, weights)
    torch.testing.assert_close(reweighted, torch.softmax(anchor, dim=0), atol=5e-3, rtol=0)


def pairwise_gradient(name, reference, theta, chosen, rejected, **hyper):
    """d/dtheta of the mean loss over the pairs, the policy a categorical softmax(theta), the reference log-probs
    `reference` (one per response); lengths (IPO) differ between chosen and rejected answers."""
    theta = theta.clone().requires_grad_()
    policy = torch.log_softmax(theta, dim=0)
    tensors = {"policy_chosen": policy[chosen], "policy_rejected": policy[rejected],
               "ref_chosen": reference[chosen], "ref_rejected": reference[rejected]}
    if name == "ipo":
        tensors.update(chosen_lengths=torch.full((len(chosen),), 3), rejected_lengths=torch.full((len(chosen),), 7))
    loss = LOSSES[name](**tensors, **hyper)[0].mean()
    return torch.autograd.grad(loss, theta)[0]


def relative_error(gradient, exact):
    return float((gradient - exact).norm() / exact.norm())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_sppo_needs_the_normaliser_and_dpo_does_not(beta):
    current, previous = toy_policies()
    anchor = (1 + ALPHA) * current - ALPHA * previous
    exact_reference = torch.log_softmax(anchor, dim=0)  # the extrapolated policy, normalised over all responses
    log_z = exact_log_z(current, previous)
    theta = current.clone()  # the proximal step starts from pihat_{t+1}
    chosen, rejected = torch.tensor([0, 2, 4, 1]), torch.tensor([3, 5, 1, 0])

    sppo = {name: pairwise_gradient("sppo", reference, theta, chosen, rejected, beta=beta)
            for name, reference in (("exact", exact_reference), ("anchor", anchor), ("normalised", anchor - log_z))}
    assert relative_error(sppo["anchor"], sppo["exact"]) > 0.01, "the unnormalised anchor biases SPPO's gradient"
    torch.testing.assert_close(sppo["normalised"], sppo["exact"], rtol=1e-12, atol=1e-12)

    generator = torch.Generator().manual_seed(2)
    estimated_errors = []
    for samples in (30, 300_000):
        draws = torch.multinomial(current.exp(), samples, replacement=True, generator=generator)
        estimate = log_normaliser_estimate(anchor[draws], current[draws])
        estimated = pairwise_gradient("sppo", anchor - estimate, theta, chosen, rejected, beta=beta)
        estimated_errors.append(relative_error(estimated, sppo["exact"]))
    assert estimated_errors[-1] < 0.01 * relative_error(sppo["anchor"], sppo["exact"]) + 1e-3

    # Margin losses: log Z cancels exactly; IPO's length-normalised margin keeps c * (1/|y_w| - 1/|y_l|).
    for name, hyper in (("dpo", {"beta": beta}), ("cdpo", {"beta": beta})):
        torch.testing.assert_close(pairwise_gradient(name, anchor, theta, chosen, rejected, **hyper),
                                   pairwise_gradient(name, exact_reference, theta, chosen, rejected, **hyper))
    ipo_exact = pairwise_gradient("ipo", exact_reference, theta, chosen, rejected, beta=beta)
    assert relative_error(pairwise_gradient("ipo", anchor, theta, chosen, rejected, beta=beta), ipo_exact) > 1e-3


def test_which_losses_need_the_normalised_anchor():
    def terms(*specs):
        return [LossTerm(name=name, **params) for name, params in specs]

    assert needs_normalised_anchor(terms(("dpo", {}), ("sft", {}), ("hinge", {}), ("cdpo", {}), ("rdpo", {}))) == []
    assert needs_normalised_anchor(terms(("fdpo", {}), ("fdpo", {"divergence": "reverse_kl"}))) == []
    assert needs_normalised_anchor(terms(("sppo", {}), ("ipo", {}), ("fdpo", {"divergence": "js"}))) == [
        "sppo", "ipo", "fdpo"]


def apo_recipe(tmp_path, **apo):
    recipe = {"model": {"name": "builtin:smollm2-135m-instruct"},
              "data": {"train": {"source": "builtin:arithmetic_prompts"}},
              "method": {"name": "apo", "losses": [{"name": "sppo", "beta": 0.1}], "apo": apo}}
    path = tmp_path / "apo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(str(path))[0]


def test_sppo_with_momentum_requires_samples_from_the_policy_itself(tmp_path):
    with pytest.raises(UserError, match=r"sample_from: policy, temperature: 1.0 and top_p: 1.0 \(now sample_from: "
                                        r"extrapolated_logits, temperature: 0.7, top_p: 0.9\)"):
        require_estimable_normaliser(apo_recipe(tmp_path))
    with pytest.raises(UserError, match=r"now temperature: 0.7\)"):
        require_estimable_normaliser(apo_recipe(tmp_path, sample_from="policy", top_p=1.0))
    require_estimable_normaliser(apo_recipe(tmp_path, sample_from="policy", temperature=1.0, top_p=1.0))
    require_estimable_normaliser(apo_recipe(tmp_path, alpha=0.0))  # every anchor is one checkpoint
    require_estimable_normaliser(apo_recipe(tmp_path, iterations=1))


class RecordedAnchor:
    """A real `AnchorLogps` whose returned tables and datasets the test keeps, to compare with a hand computation."""

    def __init__(self, anchor):
        self.anchor, self.description = anchor, anchor.description

    def __call__(self, run, datasets, groups):
        self.datasets = datasets
        self.tables = self.anchor(run, datasets, groups)
        return self.tables


def perturbed_copy(model_dir, target, seed=5, scale=0.2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


def test_trainer_anchor_subtracts_the_estimated_log_normaliser(tmp_path, tiny_model_dir, tokenizer, capsys):
    """The trainer's reference log-probs = (1+a) logp_1 - a logp_0 - log Z(x), log Z from each prompt's samples,
    all against plain float64 forwards; a pair whose prompt was not sampled keeps the unnormalised anchor."""
    from transformers import AutoModelForCausalLM

    from align_cli.pairwise.trainer import train

    previous_dir, current_dir = tiny_model_dir, perturbed_copy(tiny_model_dir, tmp_path / "pihat_1")
    prompts = [row["prompt"] for row in prompt_rows(4)]
    responses = [[f"{a} + {b} = {a + b}" for b in range(3)] for a in range(3)]
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": texts[0]}],
              "rejected": [{"role": "assistant", "content": texts[1]}]} for prompt, texts in zip(prompts, responses)]
    pairs.append({"prompt": prompts[3], "chosen": [{"role": "assistant", "content": "7"}],
                  "rejected": [{"role": "assistant", "content": "8"}]})  # no samples for this prompt
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe_path = tmp_path / "stage.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name": str(current_dir), "dtype": "float32"},
        "data": {"train": {"source": str(pairs_file)}, "eval": {"source": str(pairs_file)}, "max_length": 96,
                 "max_prompt_length": 80, "num_proc": 1},
        "method": {"name": "dpo", "losses": [{"name": "sppo", "beta": 0.1}]},
        "training": {"learning_rate": 1e-4, "batch_size": 2, "max_steps": 1, "seed": 1},
        "logging": {"progress": False, "tensorboard": False}, "evaluation": {"task": None},
        "output": {"dir": str(tmp_path / "run"), "save_final_model": False}}))
    recipe, _ = load_recipe(str(recipe_path))
    terms = ((1 + ALPHA, str(current_dir)), (-ALPHA, str(previous_dir)))
    samples = NormaliserSamples(str(current_dir), tuple(prompts[:3]), tuple(tuple(texts) for texts in responses))
    recorded = RecordedAnchor(AnchorLogps(terms, str(tmp_path / "cache"), samples))
    train(recipe, reference_logps=recorded)
    assert "1 of 4 train rows have no sampled prompt" in capsys.readouterr().out
    assert "log Z(x) (estimated from 3 samples per prompt)" in recorded.description

    current = AutoModelForCausalLM.from_pretrained(current_dir).eval().double()
    previous = AutoModelForCausalLM.from_pretrained(previous_dir).eval().double()
    known = {}

    def anchor_of(prompt, text):
        """(anchor log-prob, log-prob under the sampling checkpoint pihat_1), each forward done once."""
        key = (json.dumps(prompt), text)
        if key not in known:
            completion = [{"role": "assistant", "content": text}]
            logp_1 = completion_logp(current, tokenizer, prompt, completion)
            logp_0 = completion_logp(previous, tokenizer, prompt, completion)
            known[key] = ((1 + ALPHA) * logp_1 - ALPHA * logp_0, logp_1)
        return known[key]

    log_z = []
    for prompt, texts in zip(prompts[:3], responses):
        weights = [anchor - sampler for anchor, sampler in (anchor_of(prompt, text) for text in texts)]
        log_z.append(math.log(sum(math.exp(w) for w in weights) / len(weights)))
    log_z.append(0.0)
    assert min(abs(value) for value in log_z[:3]) > 1e-3, "the perturbed checkpoint makes log Z visibly nonzero"
    train_rows = recorded.datasets["train"]
    assert len(train_rows) == 4
    for row, pair, shift in zip(train_rows, pairs, log_z):
        assert tokenizer.decode(row["chosen_ids"]).startswith(pair["chosen"][0]["content"])  # data order kept
        for group in ("chosen", "rejected"):
            expected = anchor_of(pair["prompt"], pair[group][0]["content"])[0] - shift
            assert float(recorded.tables["train"][group][row["row_index"]]) == pytest.approx(expected, abs=2e-4)


def test_apo_with_sppo_trains_against_the_normalised_anchor(tmp_path, tiny_model_dir, reward_model_dir, capsys):
    """Two APO iterations with SPPO, sampled from the policy at temperature 1: iteration 2's anchor takes off
    log Z(x), estimated for every training pair from its prompt's samples."""
    from test_iterative_apo import apo_recipe, run

    path = apo_recipe(tmp_path, tiny_model_dir, reward_model_dir, sample_from="policy", temperature=1.0, top_p=1.0)
    recipe = yaml.safe_load(path.read_text())
    recipe["method"]["losses"] = [{"name": "sppo", "beta": 0.1}]
    path.write_text(yaml.safe_dump(recipe))
    summary = run(path)
    first, second = summary["iterations"][1:]
    assert "log Z" not in first["reference"]
    assert "- log Z(x) (estimated from 3 samples per prompt)" in second["reference"]
    printed = capsys.readouterr().out
    assert "train rows have no sampled prompt" not in printed  # every pair's prompt was sampled
    assert "4 of 4 eval rows have no sampled prompt" in printed  # the fixed held-out pairs were not


def test_validate_refuses_sppo_momentum_with_an_extrapolated_sampler(monkeypatch, capsys):
    from conftest import align

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "apo.yaml")
    override = "method.losses=[{name: sppo, beta: 0.001}]"
    code, out, err = align(monkeypatch, capsys, "validate", recipe, "--set", override)
    assert code == 2 and "apo.yaml with --set: method.apo with alpha 0.3 and loss sppo" in err
    assert "Traceback" not in out + err
    code, out, _ = align(monkeypatch, capsys, "validate", recipe, "--set", override,
                         "--set", "method.apo.sample_from=policy", "--set", "method.apo.temperature=1.0",
                         "--set", "method.apo.top_p=1.0")
    assert code == 0 and "valid" in out
