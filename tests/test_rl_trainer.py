"""The online RL trainer: rewards, overlong shaping, dynamic sampling, a 2-step run end to end, resume, plot."""

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import align, write_jsonl

from align_cli import tasks
from align_cli.config import Recipe
from align_cli.errors import UserError
from align_cli.lifecycle import Interrupted
from align_cli.recipe import load_recipe
from align_cli.rl import trainer as rl_trainer
from align_cli.rl.advantages import advantages_of, informative_groups
from align_cli.rl.data import PromptOrder
from align_cli.rl.rewards import WeightedRewards, answer_match, extract_answer, overlong_penalty
from align_cli.rl.rollout import Rollouts, to_padded


def test_overlong_shaping():
    lengths = torch.tensor([0, 10, 12, 13, 15, 16, 20])
    penalty = overlong_penalty(lengths, max_length=16, buffer=4)
    # 0 up to L_max - L_cache = 12, then (12 - |o|) / 4 down to -1 at 16, and -1 beyond
    assert penalty.tolist() == [0.0, 0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert overlong_penalty(torch.tensor([15, 16]), 16, 0).tolist() == [0.0, -1.0]


def test_rewards_builtin_callable_and_weighted_sum(tmp_path, monkeypatch):
    rows = [{"prompt": "q", "answer": "17 - 6 = 11"}] * 4
    completions = ["17 - 6 = 11", "17 - 6 = 11.\n\nThat is all.", "The answer is \\boxed{11}", "17 - 6 = 12"]
    assert answer_match(completions, rows) == [1.0, 1.0, 1.0, 0.0]
    assert extract_answer("#### 1,234") == 1234 and extract_answer("x = 3/4") == extract_answer("0.75")
    assert extract_answer("no number") is None
    (tmp_path / "my_rewards.py").write_text("def short(completions, rows, limit=12):\n"
                                            "    return [float(len(c) <= limit) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = Recipe.model_validate({"method": {"name": "grpo", "rl": {"rewards": [
        {"name": "arithmetic"}, {"name": "format", "weight": 0.5}, {"name": "my_rewards:short", "weight": 2.0, "limit": 11}]}}})
    total, parts = WeightedRewards(recipe.method.rl.rewards)(completions, rows)
    assert parts["arithmetic"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert parts["my_rewards:short"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert total.tolist() == [3.5, 0.0, 0.0, 2.5]
    for bad in ("nonexistent_module_xyz:f", "my_rewards:missing", "unknown_reward"):
        with pytest.raises(UserError):
            WeightedRewards(Recipe.model_validate({"method": {"name": "grpo", "rl": {"rewards": [{"name": bad}]}}})
                            .method.rl.rewards)


def fake_rollouts(rows, generations):
    """Each prompt's G completions: all wrong for prompts whose answer starts with an even number, else one right."""
    texts = []
    for row in rows:
        mixed = int(row["answer"].split()[0]) % 2 == 1
        texts += [row["answer"] if (mixed and j == 0) else "wrong" for j in range(generations)]
    count = len(rows) * generations
    return Rollouts([[1]] * count, [[5, 2]] * count, texts, torch.zeros(count, dtype=torch.bool),
                    torch.arange(len(rows)).repeat_interleave(generations), [r for r in rows for _ in range(generations)])


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_sampling_drops_equal_reward_groups(monkeypatch, dynamic):
    monkeypatch.setattr(rl_trainer, "generate_rollouts", lambda model, tokenizer, rows, g, **_: fake_rollouts(rows, g))
    rows = [tasks.prompt_row(p) for p in tasks.make_problems(40, seed=1)]
    recipe = Recipe.model_validate({"method": {"name": "grpo", "rl": {
        "num_generations": 4, "prompts_per_step": 3, "dynamic_sampling": dynamic, "max_sampling_rounds": 10}}})
    run = SimpleNamespace(recipe=recipe, train_data=rows, tokenizer=None)
    state = {"step": 1, "prompts_seen": 0}
    batch, rewards, metrics = rl_trainer.collect_rollouts(None, run, PromptOrder(len(rows), 0), state,
                                                          WeightedRewards(recipe.method.rl.rewards), None, 1)
    assert rewards.shape == (3, 4) and len(batch) == 12
    grouped = [batch.rows[g * 4]["answer"] for g in range(3)]
    if dynamic:
        assert informative_groups(rewards).all()
        assert all(int(a.split()[0]) % 2 == 1 for a in grouped)
        assert state["prompts_seen"] == 3 * metrics["sampling/rounds"] and metrics["groups/informative"] < 1
    else:
        assert state["prompts_seen"] == 3 and metrics["sampling/rounds"] == 1
    # the batch stays group-major: each group's 4 completions share its prompt row
    assert all(batch.rows[g * 4 + j] is batch.rows[g * 4] for g in range(3) for j in range(4))


def test_informative_groups_and_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    assert informative_groups(rewards).tolist() == [False, True, False]
    lengths = torch.tensor([[3.0, 3.0, 3.0], [2.0, 8.0, 2.0], [1.0, 1.0, 1.0]])
    grpo = advantages_of(rewards, lengths)
    assert torch.all(grpo[0] == 0) and grpo[1, 1] > 0
    token_level = advantages_of(rewards, lengths, token_level=True, fallback=None)
    assert abs(float((token_level[1] * lengths[1]).sum())) < 1e-5
    # a fallback below the largest |A| swaps that group back to GRPO's advantages
    torch.testing.assert_close(advantages_of(rewards, lengths, token_level=True, fallback=0.5)[1], grpo[1])


def test_to_padded_and_prompt_order():
    flat = torch.arange(6.0)
    assert to_padded(flat, torch.tensor([3, 1, 2])).tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    order = PromptOrder(10, seed=3, world_size=2, rank=1)
    assert order.take(0, 3) == PromptOrder(10, 3).take(3, 3)
    assert sorted(PromptOrder(10, 3).take(0, 10)) == list(range(10))


@pytest.fixture
def rl_recipe(tmp_path, tiny_model_dir):
    rows = [tasks.prompt_row(p) for p in tasks.make_problems(16, seed=3)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "tiny_rewards.py").write_text(
        "def vowels(completions, rows):\n    return [sum(c in 'aeiou' for c in t) / (1 + len(t)) for t in completions]\n")

    def make(**rl_overrides):
        rl = {"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 6, "generation_batch_size": 2,
              "rewards": [{"name": "tiny_rewards:vowels"}, {"name": "arithmetic", "weight": 0.5}], **rl_overrides}
        loss = rl.pop("loss", "grpo")
        losses = [loss if isinstance(loss, dict) else {"name": loss}]
        peft = rl.pop("peft", {"enabled": False})
        recipe = {
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "data": {"train": {"source": str(prompts)}, "max_length": 96, "max_prompt_length": 80},
            "method": {"name": "grpo", "losses": losses, "rl": rl},
            "peft": peft,
            "training": {"learning_rate": 1e-3, "batch_size": 3, "max_steps": 2, "seed": 1, "warmup_ratio": 0.0,
                         "lr_scheduler": "constant"},
            "logging": {"progress": False, "tensorboard": False},
            "checkpointing": {"every": 1, "keep_last": 2},
            "evaluation": {"task": "arithmetic", "num_prompts": 2, "max_new_tokens": 4, "batch_size": 2},
            "output": {"dir": str(tmp_path / "run")},
        }
        path = tmp_path / "rl.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


def test_online_run_end_to_end(rl_recipe, tmp_path, monkeypatch, capsys):
    """Every part at once: HAPO loss + adaptive temperature + token-level advantages, D^3S, dynamic sampling,
    overlong shaping, truncation masking, 2 passes x 2 mini-batches, KL to a frozen reference."""
    monkeypatch.chdir(tmp_path)  # the `module:function` reward is imported from the working directory
    path = rl_recipe(loss={"name": "hapo", "kl_beta": 0.05}, dynamic_sampling=True, overlong_shaping=True, overlong_buffer=2, mask_truncated=True,
                     passes=2, mini_batches=2,
                     d3s={"enabled": True, "m_init": 2, "m_final": 4, "keep_init": 50, "keep_final": 100},
                     hapo={"adaptive_temperature": True, "token_level_advantage": True})
    code, _, err = align(monkeypatch, capsys, "train", str(path))
    assert code == 0, err
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    first, second = train
    assert first["d3s/m"] == 2 and first["d3s/keep_percent"] == 50 and second["d3s/m"] == 4
    assert "hapo/temperature_factor" not in first and "hapo/temperature_factor" in second  # off on step 1
    for record in train:
        assert all(k in record for k in ("reward/mean", "reward/tiny_rewards:vowels", "reward/overlong", "loss",
                                         "clip_ratio/high", "entropy/mean", "grad_norm", "kl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "task_accuracy" in summary["after"] and summary["loss"]["name"] == "hapo"
    assert (run_dir / "final_model" / "config.json").exists()


def test_hapo_released_preset_runs(rl_recipe, tmp_path, monkeypatch, capsys):
    """The `released` preset end to end: its loss values reach the loss (dual clip logged), the signal is
    recomputed per micro-batch from the current policy, tokens are scored at the base temperature."""
    monkeypatch.chdir(tmp_path)
    path = rl_recipe(loss="hapo", passes=2, temperature=0.7,
                     hapo={"preset": "released", "adaptive_temperature": True, "token_level_advantage": True})
    code, _, err = align(monkeypatch, capsys, "train", str(path), "--set", "output.save_final_model=false")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: summary["loss"][k] for k in ("eps_low", "eps_high", "dual_clip")} == {
        "eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0}
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("clip_ratio/dual" in r for r in train if r["split"] == "train")


def test_resume_matches_uninterrupted(rl_recipe, tmp_path, monkeypatch):
    """GSPO with LoRA, D^3S and a KL term whose reference is the adapter-disabled policy, stopped after step 1
    and resumed: the final weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    path = rl_recipe(loss={"name": "gspo", "kl_beta": 0.05}, d3s={"enabled": True, "m_init": 2, "m_final": 4},
                     peft={"enabled": True, "r": 4, "alpha": 8})
    path.write_text(path.read_text().replace("task: arithmetic", "task: null"))  # no evaluation: faster

    def run(output, **kwargs):
        recipe, recipe_path = load_recipe(str(path))
        return rl_trainer.train_rl(recipe, recipe_path, output_dir=str(tmp_path / output), **kwargs)

    run("straight")

    def stop_after_one(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run("resumed", on_step_end=stop_after_one)
    run("resumed", resume=True)
    straight = load_file(tmp_path / "straight" / "final_model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final_model" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_recipe_validation_of_rl_settings(tmp_path):
    with pytest.raises(ValueError, match="online RL losses"):
        Recipe.model_validate({"method": {"name": "dpo", "losses": [{"name": "dapo"}]}})
    with pytest.raises(ValueError, match="exactly one loss term"):
        Recipe.model_validate({"method": {"name": "grpo", "losses": [{"name": "dpo"}]}})
    with pytest.raises(ValueError, match="must not exceed"):
        Recipe.model_validate({"method": {"name": "grpo", "rl": {"num_generations": 4, "d3s": {"enabled": True}}}})
    recipe = Recipe.model_validate({"method": {"name": "grpo"}})
    assert recipe.method.losses[0].name == "grpo" and recipe.method.rl.hapo.settings.entropy_sign == "paper"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "grpo", "losses": [{"name": "gspo", "eps_hgh": 0.1}]}}))
    with pytest.raises(UserError, match="eps_high"):
        load_recipe(str(path))


@pytest.mark.parametrize("name", ["grpo", "dapo", "d3s", "hapo"])
def test_shipped_rl_recipes_validate(name):
    recipe, _ = load_recipe(name)
    assert recipe.method.name == "grpo" and recipe.model.name == "builtin:smollm2-135m-instruct"
    assert recipe.data.train.source == "builtin:arithmetic_prompts"
    assert any(term.name == "arithmetic" for term in recipe.method.rl.rewards)


def test_optimise_gradient_is_independent_of_micro_batch_size(tiny_model_dir):
    """`update.optimise` over micro-batches of 2 accumulates exactly the gradient of one micro-batch of 6,
    through `accelerator.backward` (which divides by its accumulation steps) and the global normaliser."""
    from accelerate import Accelerator
    from align_cli.losses import LOSSES
    from transformers import AutoModelForCausalLM

    from align_cli.rl.rollout import completion_mask
    from align_cli.rl.update import TrainBatch, optimise

    class Capture:
        def __init__(self, model):
            self.model, self.grads = model, None

        def step(self):
            self.grads = [p.grad.clone() for p in self.model.parameters() if p.grad is not None]

        def zero_grad(self, set_to_none=True):
            self.model.zero_grad(set_to_none=set_to_none)

    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(10, 200, (n,), generator=generator).tolist() for n in (3, 5, 1, 4, 2, 5)]
    rollouts = Rollouts([[1, 2, 3]] * 6, completions, [""] * 6, torch.zeros(6, dtype=torch.bool),
                        torch.arange(6) // 3, [{}] * 6)
    mask = completion_mask(rollouts.lengths)
    loss_mask = mask.clone()
    loss_mask[1, 0] = 0.0
    batch = TrainBatch(rollouts, torch.tensor([1.0, -0.5, 0.3, -1.0, 0.7, 0.2]), mask, loss_mask,
                       -3.0 + 0.1 * torch.rand(mask.shape, generator=generator), None, None)
    grads = {}
    for size in (6, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
        optimizer = Capture(model)
        for aggregation in ("token-mean", "seq-mean-token-mean"):
            optimise(model, batch, loss_function=LOSSES["dapo"], params={"aggregation": aggregation}, weight=1.0,
                     aggregation=aggregation, accelerator=accelerator, optimizer=optimizer,
                     scheduler=SimpleNamespace(step=lambda: None), passes=1, mini_batches=1, micro_batch_size=size,
                     max_grad_norm=None, pad_id=0, fused=True, seed=0)
            grads[size, aggregation] = optimizer.grads
    from align_cli.rl.update import micro_batch_loss

    for aggregation in ("token-mean", "seq-mean-token-mean"):
        # the reference: one plain backward of the whole batch's loss, normalised by its own count
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loss, _ = micro_batch_loss(model, batch, torch.arange(6), LOSSES["dapo"], {"aggregation": aggregation},
                                   None, 0, True)
        loss.backward()
        expected = [p.grad for p in model.parameters() if p.grad is not None]
        for reference, whole, parts in zip(expected, grads[6, aggregation], grads[2, aggregation]):
            torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(parts, reference, rtol=1e-4, atol=1e-7)


def test_plot_overlays_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    runs = []
    for name, slope in (("a", 0.1), ("b", 0.05)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        records = [{"step": s, "split": "train", "reward/mean": slope * s} for s in range(1, 6)]
        records.append({"step": 5, "split": "eval", "task_accuracy": 0.5})
        write_jsonl(run_dir / "metrics.jsonl", records)
        runs.append(str(run_dir))
    png = tmp_path / "out" / "curves.png"
    code, _, err = align(monkeypatch, capsys, "plot", *runs, "--metric", "reward/mean", "--metric",
                           "eval/task_accuracy", "--label", "A", "--label", "B", "--smooth", "2", "--output", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from align_cli.plotting import metric_series

    steps, values = metric_series(tmp_path / "a", "reward/mean")
    assert steps == [1, 2, 3, 4, 5] and values == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert metric_series(tmp_path / "a", "eval/task_accuracy") == ([5], [0.5])
    code, _, err = align(monkeypatch, capsys, "plot", runs[0], "--metric", "no/such", "--output", str(png))
    assert code == 2 and "no/such" in err
    code, _, err = align(monkeypatch, capsys, "plot", str(tmp_path), "--metric", "loss", "--output", str(png))
    assert code == 2 and "metrics.jsonl" in err


def test_the_loss_declares_the_entropy_signal_it_needs():
    """The loop computes HAPO's entropy signal (and applies HAPO's preset) for a loss that takes
    `token_entropy_signal`, whatever its name."""
    from align_cli.losses import LOSSES

    from align_cli.rl.trainer import takes_entropy_signal

    assert {name for name in ("grpo", "dapo", "gspo", "hapo") if takes_entropy_signal(LOSSES[name])} == {"hapo"}


@pytest.mark.parametrize("environment, engine", [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
                                                 ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed")])
def test_sharding_engines_are_refused_before_anything_is_written(rl_recipe, tmp_path, monkeypatch, capsys,
                                                                 environment, engine):
    """What `accelerate launch` exports for an FSDP2 or DeepSpeed config: the online loop, which sets up
    neither, stops with exit 2 and a reason, and creates no run directory."""
    monkeypatch.chdir(tmp_path)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    code, _, err = align(monkeypatch, capsys, "train", str(rl_recipe()))
    assert code == 2, err
    assert f"does not run under {engine}" in err and "--accelerate-config ddp" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_two_ddp_processes_train_online(rl_recipe, tmp_path):
    """DDP keeps working: two gloo processes (torchrun, what `accelerate launch` does with NCCL on GPUs) each
    sample their own prompts and train the shared policy; rank 0 logs and writes the summary."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = rl_recipe()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "align_cli.cli", "train", str(path),
                           "--set", "output.save_final_model=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["prompts_seen"] == 2 * 2 * 2  # 2 steps x 2 prompts x 2 processes


def test_online_run_with_chunked_mlps_scores_as_the_run_without(rl_recipe, tmp_path, monkeypatch, capsys):
    """`training.mlp_chunk_tokens` in the online loop: its update's forward runs the MLPs in chunks (rollouts and
    scores run them whole), and the first step's loss and gradient norm equal the run without, to float rounding."""
    from align_cli import chunked_mlp

    calls = []
    original = chunked_mlp._run_in_chunks
    monkeypatch.setattr(chunked_mlp, "_run_in_chunks", lambda *a: calls.append(1) or original(*a))
    monkeypatch.chdir(tmp_path)
    firsts = {}
    for chunk in (None, 64):
        path = rl_recipe()
        out = tmp_path / f"run-{chunk}"
        code, _, err = align(monkeypatch, capsys, "train", str(path), "--set", f"output.dir={out}", "--set",
                             "training.max_steps=1", "--set", f"training.mlp_chunk_tokens={chunk or 'null'}",
                             "--set", "output.save_final_model=false", "--set", "evaluation.task=null")
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["memory"] == {"mlp_chunk_tokens": chunk, "chunked_mlps": 2 if chunk else 0,
                                     "reference_offloaded_bytes": 0}
        firsts[chunk] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                         if json.loads(line)["split"] == "train"][0]
        assert bool(calls) == bool(chunk)
    assert firsts[64]["loss"] == pytest.approx(firsts[None]["loss"], abs=1e-5)
    assert firsts[64]["grad_norm"] == pytest.approx(firsts[None]["grad_norm"], rel=1e-4)


def test_online_run_profiles_the_chosen_step(rl_recipe, tmp_path, monkeypatch, capsys):
    """`logging.profile_step: 2` in the online loop: step 2 (rollouts, scores, update) is summarised."""
    monkeypatch.chdir(tmp_path)
    code, _, err = align(monkeypatch, capsys, "train", str(rl_recipe()), "--set", "logging.profile_step=2",
                         "--set", "output.save_final_model=false", "--set", "evaluation.task=null")
    assert code == 0, err
    profiles = list((tmp_path / "run" / "profile").iterdir())
    assert [p.name for p in profiles] == ["step-2-rank0.json"]
    summary = json.loads(profiles[0].read_text())
    assert summary["groups_s"]["matmul"] > 0 and summary["wall_s"] > 0


def test_kl_reference_offloaded_matches_the_resident_one(rl_recipe, tmp_path, monkeypatch):
    """GRPO with a KL term to a separate frozen reference, `reference.offload` on and off: the same KL, losses and
    final weights bit for bit (the reference's weights are the same bits wherever they wait)."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    path = rl_recipe(loss={"name": "grpo", "kl_beta": 0.05})
    path.write_text(path.read_text().replace("task: arithmetic", "task: null"))

    def run(output, *overrides):
        recipe, recipe_path = load_recipe(str(path), list(overrides))
        return rl_trainer.train_rl(recipe, recipe_path, output_dir=str(tmp_path / output))

    run("resident")
    summary = run("offloaded", "reference.offload=true")
    assert summary["memory"]["reference_offloaded_bytes"] > 0
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("offloaded", "resident")]
    kept = [[(r["step"], r.get("kl"), r.get("loss")) for r in rs if r["split"] == "train"] for rs in records]
    assert kept[0] == kept[1] and all(kl is not None for _, kl, _ in kept[0])
    expected = load_file(str(tmp_path / "resident" / "final_model" / "model.safetensors"))
    for name, tensor in load_file(str(tmp_path / "offloaded" / "final_model" / "model.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name
