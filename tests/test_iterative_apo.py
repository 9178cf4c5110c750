"""APO end to end on a tiny model: the extrapolated reference against a hand computation, alpha = 0 against
iterative DPO written out by hand, resume in the middle of an iteration, and the per-iteration table."""

import json
import os

import pytest
import torch
import yaml
from iterative_fixtures import (  # noqa: F401
    completion_logp,
    load_weights,
    pair_rows,
    prompt_rows,
    reward_model_dir,
    sigint_on_call,
    write_jsonl,
)

from align_cli.iterative.apo import run_apo
from align_cli.lifecycle import Interrupted
from align_cli.recipe import load_recipe

BETA = 0.1


def apo_recipe(directory, model_dir, reward_dir, **apo):
    """Two iterations of 8 prompts x 3 samples, reward-model ranked (a random tiny model's samples are all
    wrong, so the rule ranker would tie them all), fixed held-out pairs."""
    directory.mkdir(parents=True, exist_ok=True)
    prompts = write_jsonl(directory / "prompts.jsonl", prompt_rows(16))
    held_out = write_jsonl(directory / "held_out_pairs.jsonl", pair_rows(4))
    recipe = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": {"source": str(prompts)}, "eval": {"source": str(held_out)}, "max_length": 96,
                 "max_prompt_length": 80},
        "method": {"name": "apo", "losses": [{"name": "dpo", "beta": BETA}],
                   "apo": {"iterations": 2, "prompts_per_iteration": 8, "samples_per_prompt": 3, "max_new_tokens": 6,
                           "generation_batch_size": 4, "alpha": 0.5, "sample_from": "extrapolated_logits",
                           "ranker": {"name": "reward_model", "model": str(reward_dir)}, **apo}},
        "training": {"learning_rate": 1e-3, "batch_size": 4, "num_epochs": 1, "seed": 1, "warmup_ratio": 0.0,
                     "lr_scheduler": "constant"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpointing": {"every": 1, "keep_last": 1},
        "evaluation": {"task": None},
        "output": {"dir": str(directory / "run")},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(path, **kwargs):
    recipe, resolved = load_recipe(str(path))
    return run_apo(recipe, resolved, **kwargs)


@pytest.fixture(scope="module")
def apo_run(tmp_path_factory, tiny_model_dir, reward_model_dir):
    directory = tmp_path_factory.mktemp("apo")
    summary = run(apo_recipe(directory, tiny_model_dir, reward_model_dir))
    return directory, summary


def test_iterations_write_every_phase_and_the_table(apo_run):
    directory, summary = apo_run
    run_dir = directory / "run"
    for iteration in (1, 2):
        folder = run_dir / f"iteration-{iteration}"
        for name in ("samples.jsonl", "rankings.jsonl", "pairs.jsonl", "sampling.json", "train/summary.json"):
            assert (folder / name).exists(), name
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and all(len(row["responses"]) == 3 for row in samples)
    assert [row["iteration"] for row in summary["iterations"]] == [0, 1, 2]
    first, second = summary["iterations"][1:]
    assert first["sample_from"] == "policy" and second["sample_from"] == "extrapolated_logits"
    assert first["pairs"] + first["tied_prompts"] == 8 and first["steps"] >= 1
    assert "1.5 x logp" in second["reference"] and "-0.5 x logp" in second["reference"]
    assert (run_dir / "final_model").resolve() == (run_dir / "iteration-2" / "train" / "final_model").resolve()
    assert json.loads((run_dir / "summary.json").read_text())["table"] == summary["table"]
    pairs = [json.loads(line) for line in (run_dir / "iteration-1" / "pairs.jsonl").read_text().splitlines()]
    # SPPO's soft targets travel with every pair: the best response beats the sampling policy more often than the worst
    assert pairs and all(0 < p["rejected_win_probability"] < p["chosen_win_probability"] < 1 for p in pairs)


def test_iteration_two_reference_is_the_extrapolated_anchor(apo_run, tokenizer):
    """At iteration 2's first step the policy is pihat_1 and the reference (1+a) logp(pihat_1) - a logp(pihat_0),
    so on every held-out pair h(y) = -a (logp_1(y) - logp_0(y)); the trainer's measured rewards/chosen is
    beta * mean h(y_w). Iteration 1's anchor is pihat_0 = the policy: rewards exactly 0."""
    from transformers import AutoModelForCausalLM

    directory, _ = apo_run
    run_dir = directory / "run"
    first_before = json.loads((run_dir / "iteration-1" / "train" / "before.json").read_text())
    assert first_before["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first_before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)

    start = AutoModelForCausalLM.from_pretrained(yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["name"]).eval()
    pihat_1 = AutoModelForCausalLM.from_pretrained(run_dir / "iteration-1" / "train" / "final_model").eval()
    held_out = [json.loads(line) for line in (directory / "held_out_pairs.jsonl").read_text().splitlines()]
    alpha = 0.5
    chosen, rejected = [], []
    for row in held_out:
        for column, out in (("chosen", chosen), ("rejected", rejected)):
            logp_1 = completion_logp(pihat_1, tokenizer, row["prompt"], row[column])
            logp_0 = completion_logp(start, tokenizer, row["prompt"], row[column])
            reference = (1 + alpha) * logp_1 - alpha * logp_0
            out.append(BETA * (logp_1 - reference))
    second_before = json.loads((run_dir / "iteration-2" / "train" / "before.json").read_text())
    assert second_before["rewards/chosen"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-3, abs=1e-5)
    assert second_before["rewards/rejected"] == pytest.approx(sum(rejected) / len(rejected), rel=1e-3, abs=1e-5)
    assert abs(second_before["rewards/chosen"]) > 1e-4  # the momentum term is really there


def test_resume_in_the_middle_of_an_iteration(apo_run, tmp_path, tiny_model_dir, reward_model_dir):
    directory, _ = apo_run
    path = apo_recipe(tmp_path, tiny_model_dir, reward_model_dir)
    steps_first = json.loads((directory / "run" / "iteration-1" / "train" / "summary.json").read_text())["steps"]
    with pytest.raises(Interrupted):
        run(path, on_step_end=sigint_on_call(steps_first + 1))  # the first step of iteration 2
    run_dir = tmp_path / "run"
    assert not (run_dir / "iteration-2" / "train" / "summary.json").exists()
    stamps = {name: (run_dir / name).stat().st_mtime_ns for name in
              ("iteration-1/samples.jsonl", "iteration-1/train/final_model/model.safetensors",
               "iteration-2/samples.jsonl", "iteration-2/pairs.jsonl")}
    resumed_steps = []
    run(path, resume=True, on_step_end=resumed_steps.append)
    assert {name: (run_dir / name).stat().st_mtime_ns for name in stamps} == stamps  # nothing regenerated
    assert resumed_steps and resumed_steps[0] == 2  # continued after the checkpointed step 1
    resumed = load_weights(run_dir / "iteration-2" / "train" / "final_model")
    straight = load_weights(directory / "run" / "iteration-2" / "train" / "final_model")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_alpha_zero_is_iterative_dpo(tmp_path, tiny_model_dir, reward_model_dir, tokenizer):
    """APO with alpha = 0 against iterative DPO written out with the plain pieces: sample from the last model,
    rank, best vs worst, train DPO whose reference is the last model (a live frozen copy)."""
    from transformers import AutoModelForCausalLM

    from align_cli.generation import SamplingSettings, generate
    from align_cli.iterative.rankers import RewardModelRanker
    from align_cli.pairwise.trainer import train

    path = apo_recipe(tmp_path / "apo", tiny_model_dir, reward_model_dir, alpha=0.0)
    run(path)
    prompts = prompt_rows(16)
    ranker = RewardModelRanker(str(reward_model_dir), batch_size=16)
    current = str(tiny_model_dir)
    for iteration in (1, 2):
        rows = prompts[(iteration - 1) * 8: iteration * 8]
        model = AutoModelForCausalLM.from_pretrained(current).eval()
        settings = SamplingSettings(max_new_tokens=6, temperature=0.7, top_p=0.9, num_samples=3, seed=1 + iteration,
                                    batch_size=4)
        samples = generate(model, tokenizer, [r["prompt"] for r in rows], settings)
        scores = ranker.score(rows, samples)
        pairs = []
        for row, texts, values in zip(rows, samples, scores):
            if max(values) > min(values):
                pairs.append({"prompt": row["prompt"],
                              "chosen": [{"role": "assistant", "content": texts[values.index(max(values))]}],
                              "rejected": [{"role": "assistant", "content": texts[values.index(min(values))]}]})
        pairs_file = write_jsonl(tmp_path / f"pairs-{iteration}.jsonl", pairs)
        recipe, _ = load_recipe(str(path), [f"model.name={current}", f"reference.name={current}", "method.name=dpo",
                                            f"data.train.source={pairs_file}",
                                            f"output.dir={tmp_path / f'dpo-{iteration}'}"])
        current = train(recipe)["final_model_dir"]
    apo_weights = load_weights(tmp_path / "apo" / "run" / "iteration-2" / "train" / "final_model")
    dpo_weights = load_weights(tmp_path / "dpo-2" / "final_model")
    for name, tensor in dpo_weights.items():
        torch.testing.assert_close(apo_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_split_the_sampling_and_share_every_phase(tmp_path, tiny_model_dir, reward_model_dir):
    """`align train` of an APO recipe under torchrun (CPU, gloo; `accelerate launch` does the same on GPUs):
    each process samples half the prompts, the main process writes every phase once, training is distributed."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = apo_recipe(tmp_path, tiny_model_dir, reward_model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "align_cli.cli", "train", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "run"
    for iteration in (1, 2):
        folder = run_dir / f"iteration-{iteration}"
        sampling = json.loads((folder / "sampling.json").read_text())
        assert sampling["processes"] == 2 and sampling["engine"] == "transformers"
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        prompts = [row["prompt"] for row in prompt_rows(16)][(iteration - 1) * 8: iteration * 8]
        assert [row["prompt"] for row in samples] == prompts  # the two halves gathered back in order
        assert all(len(row["responses"]) == 3 for row in samples)
        assert not list(folder.glob(".*.tmp")), "no half-written phase file"
        train = json.loads((folder / "train" / "summary.json").read_text())
        assert train["steps"] >= 1 and train["processes"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["iteration"] for row in summary["iterations"]] == [0, 1, 2]
    assert (run_dir / "final_model").resolve() == (run_dir / "iteration-2" / "train" / "final_model").resolve()
    assert done.stdout.count("APO (alpha=") == 1, "the table is printed once, by the main process"
