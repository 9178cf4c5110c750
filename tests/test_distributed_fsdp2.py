"""FSDP2 + LoRA with bf16 mixed precision (issue 19), on CPU: one gloo process through `accelerate launch` with
the shipped fsdp2 launch config (tests/fsdp2_worker.py gives Accelerate the FSDP state it builds on GPUs).

The configuration that failed in benchmarks/RESULTS.md: LoRA, `precision: bf16`, fp32 weights, the
adapter-disabled policy as reference with its log-probs precomputed (so FSDP2's first forward is the
reference's). FSDP2's policy (`distributed.fsdp2_mixed_precision`) computes with bf16 parameters over fp32
master weights, which is what one plain process computes from bf16 base weights and fp32 adapters
(`model.dtype: bfloat16`, PEFT keeps adapters in fp32, bf16 autocast): the two runs must agree step for step.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp2_worker.py")
FSDP2_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp2.yaml"
LEARNING_RATE = 1e-3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_records(run_dir: Path) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["split"] == "train"]


def fsdp2_checkpoint_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The full model state of an FSDP2 checkpoint (torch.distributed.checkpoint, sharded), read on one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", scratch)
    return torch.load(scratch, weights_only=True)["model"]


def test_fsdp2_lora_bf16_trains_like_one_process(tiny_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(peft__enabled=True, peft__r=8, training__precision="bf16", training__max_steps=2,
                         training__learning_rate=LEARNING_RATE, training__batch_size=4, reference__precompute=True,
                         evaluation__task=None, logging__tensorboard=False, checkpointing__every=2)
    fsdp2, single = tmp_path / "fsdp2", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # Side by side (two cores), each with its own reference cache: each computes its reference log-probs.
    runs = [
        subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                          str(FSDP2_CONFIG), "--num_processes", "1", "--main_process_port", str(free_port()),
                          str(WORKER), str(recipe), str(fsdp2), f"reference.cache_dir={tmp_path / 'cache-fsdp2'}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "align_cli.cli", "train", str(recipe), "--output-dir", str(single),
                          "--set", f"reference.cache_dir={tmp_path / 'cache-single'}", "--set", "model.dtype=bfloat16"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True),
    ]
    try:
        for run in runs:
            output, _ = run.communicate(timeout=240)
            assert run.returncode == 0, output[-4000:]
    finally:
        for run in runs:
            if run.poll() is None:  # timed out: the launcher and the worker it started
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()

    records, expected_records = train_records(fsdp2), train_records(single)
    losses = [r["loss"] for r in records]
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses)).all()
    assert losses[0] == pytest.approx(0.693147, abs=1e-6)  # the reference is the starting policy: log 2
    assert losses == pytest.approx([r["loss"] for r in expected_records], rel=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected_records], rel=1e-5)

    weights = fsdp2_checkpoint_weights(fsdp2 / "checkpoints" / "step-0000002", tmp_path / "fsdp2-step-2.pt")
    # Every base weight is the starting model's, bit for bit (under its PEFT name).
    base = load_file(tiny_model_dir / "model.safetensors")
    base.setdefault("lm_head.weight", base["model.embed_tokens.weight"])  # tied: the state dict names it twice
    base_in_run = {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
                   for name, tensor in weights.items() if ".lora_" not in name}
    assert base_in_run.keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(base_in_run[name], tensor), f"{name} changed under LoRA"
    # PEFT starts every lora_B at zero: after two steps all of them have moved.
    adapters = {name: tensor for name, tensor in weights.items() if ".lora_" in name}
    lora_b = [name for name in adapters if ".lora_B." in name]
    assert lora_b and all(adapters[name].abs().max() > 0 for name in lora_b)
    # The plain process's adapters (its checkpoint keeps only them). Its lora_A were drawn in bf16 (PEFT creates
    # adapters in the base layer's dtype, then upcasts them), the FSDP2 run's in fp32: the same draws up to bf16
    # rounding (at most 2^-8 of the starting value), which bf16 compute does not see, so every gradient and every
    # lora_B are the same. lora_A moved by at most two AdamW steps of the learning rate since.
    expected = load_file(single / "checkpoints" / "step-0000002" / "model.safetensors")
    assert expected.keys() == adapters.keys()
    for name, tensor in expected.items():
        if ".lora_B." in name:
            torch.testing.assert_close(adapters[name], tensor, rtol=1e-5, atol=1e-8, msg=name)
        else:
            starting_magnitude = float(tensor.abs().max()) + 2 * LEARNING_RATE
            torch.testing.assert_close(adapters[name], tensor, rtol=0, atol=2 ** -8 * starting_magnitude, msg=name)


def test_fsdp2_compiled_layers_compile_or_fall_back(tiny_recipe, tmp_path):
    """`training.compile: true` under FSDP2 (one gloo process, as above): the compiled layers either train or
    fall back to eager with the reason in summary.json; either way the run completes with finite losses equal
    to the uncompiled FSDP2 run's."""
    recipe = tiny_recipe(training__max_steps=2, training__batch_size=4, evaluation__task=None,
                         logging__tensorboard=False, checkpointing__every=None, output__save_final_model=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ALIGN_COMPILE_BACKEND": "aot_eager"}
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(FSDP2_CONFIG),
         "--num_processes", "1", "--main_process_port", str(free_port()), str(WORKER), str(recipe),
         str(tmp_path / name), f"training.compile={'true' if name == 'compiled' else 'false'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for name in ("compiled", "eager")}
    try:
        for run in runs.values():
            output, _ = run.communicate(timeout=240)
            assert run.returncode == 0, output[-4000:]
    finally:
        for run in runs.values():
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile"]["enabled"] and summary["compile"]["policy"]["backend"] == "aot_eager"
    compiled, eager = ([r["loss"] for r in train_records(tmp_path / name)] for name in ("compiled", "eager"))
    assert len(compiled) == 2 and torch.isfinite(torch.tensor(compiled)).all()
    assert compiled == pytest.approx(eager, abs=1e-5)
