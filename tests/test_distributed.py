"""Several processes: a 2-process gloo run of a tiny recipe equals one process with the same global batch.

The two processes (torchrun, CPU, gloo: what `accelerate launch` does on GPUs with NCCL) must see
disjoint rows whose union is the single process's batch, log the same losses and end with the same
weights; the reference log-probs they precompute are shared through one cache file. The same process
group then checks that log-probs through an FSDP2-sharded model equal the unsharded ones (the trainer
calls the model whole, so FSDP2's hooks gather the parameters).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_cli.distributed import global_token_mean, launch_command, merge_lora_state_dict
from align_cli.errors import UserError

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_recipe, tmp_path):
    cache = tmp_path / "refcache"
    # A warm-up and decay: the schedule must advance once per optimiser step, whatever the process count.
    recipe = tiny_recipe(training__batch_size=2, training__max_steps=3, training__precision="fp32",
                         training__lr_scheduler="cosine", training__warmup_steps=1,
                         evaluation__task=None, logging__tensorboard=False, checkpointing__every=2,
                         reference__precompute=True, reference__cache_dir=str(cache), logging__profile_step=2)
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(recipe), str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The single process reads the reference log-probs the two processes computed and shared.
    done = subprocess.run([sys.executable, str(WORKER), str(recipe), str(one), "--set", "training.batch_size=4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((two / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    single = json.loads((one / "seen-0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert all(r["fsdp2_logprobs_match"] for r in ranks)
    # The two processes also collated their reference precompute (the single one found it cached):
    # the training micro-batches are the last ones each process collated.
    steps = len(single["rows"])
    assert steps == 3
    for step, batch in enumerate(single["rows"]):
        first, second = ranks[0]["rows"][step - steps], ranks[1]["rows"][step - steps]
        assert not set(first) & set(second), f"micro-batch {step}: ranks shared rows {set(first) & set(second)}"
        assert sorted(first + second) == sorted(batch), f"micro-batch {step}: ranks' union differs from one process"

    assert single["reference"] == ranks[0]["reference"] == "cached"
    summary = json.loads((one / "summary.json").read_text())
    assert summary["reference_rows_computed"] == {"train": 0, "eval": 0}, "the 2-process run cached every row"

    two_records, one_records = train_records(two), train_records(one)
    assert len(two_records) == len(one_records) == 3
    assert [r["learning_rate"] for r in two_records] == pytest.approx([r["learning_rate"] for r in one_records])
    assert [r["loss"] for r in two_records] == pytest.approx([r["loss"] for r in one_records], rel=1e-5, abs=1e-6)
    # logging.profile_step: every process profiled step 2; only the two processes spent time in collectives.
    profiles = [json.loads((run / "profile" / f"step-2-rank{rank}.json").read_text())
                for run, rank in ((two, 0), (two, 1), (one, 0))]
    assert all(p["measured"] == "cpu operators' own time" and p["groups_s"]["matmul"] > 0 for p in profiles)
    assert all(p["groups_s"].get("communication", 0) > 0 for p in profiles[:2]), [p["groups_s"] for p in profiles]
    assert profiles[2]["groups_s"].get("communication", 0) == 0, profiles[2]["top"]
    expected = load_file(one / "final_model" / "model.safetensors")
    actual = load_file(two / "final_model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_state_dict_merges_like_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    merged = merge_lora_state_dict(model.state_dict(), 8 / 4)
    expected = model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_global_token_mean_is_exact_under_gradient_averaging():
    class Two:  # what each of two processes sees: the other process's token count arrives through reduce
        num_processes = 2

        def __init__(self, other_count):
            self.other_count = other_count

        def reduce(self, tensor, _):
            return tensor + self.other_count

    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 0.0])]
    masks = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])]
    shares = [global_token_mean(values[0], masks[0], Two(1.0)), global_token_mean(values[1], masks[1], Two(3.0))]
    # DDP averages the processes' gradients, i.e. their losses: the mean of shares is the global token mean.
    assert float(sum(shares) / 2) == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_accelerate_config_relaunch_command():
    command = launch_command("fsdp2", 4, ["train", "dpo", "--set", "training.batch_size=2"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    config = Path(command[command.index("--config_file") + 1])
    assert config.name == "fsdp2.yaml" and config.exists()
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-6:] == ["-m", "align_cli.cli", "train", "dpo", "--set", "training.batch_size=2"]
    with pytest.raises(UserError, match="shipped launch config"):
        launch_command("fsdp3", 2, ["train", "dpo"])


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3", "zero3_offload", "multi_node"])
def test_shipped_launch_configs_parse(name):
    import yaml

    from align_cli.distributed import shipped_accelerate_configs

    config = yaml.safe_load(shipped_accelerate_configs()[name].read_text())
    assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    if name == "fsdp2":
        assert config["fsdp_config"]["fsdp_version"] == 2
    if name.startswith("zero"):
        assert config["deepspeed_config"]["zero_stage"] == int(name[4])
    if name == "multi_node":
        assert config["num_machines"] == 2 and "main_process_ip" in config
