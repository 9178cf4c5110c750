"""Bit-equal check for restructuring (issue 16): run tiny CPU versions of the shipped recipes of each method
family and compare their logged numbers with an earlier run's.

    python benchmarks/restructure_check.py run /tmp/before     # once, before the change
    python benchmarks/restructure_check.py run /tmp/after      # after it
    python benchmarks/restructure_check.py compare /tmp/before /tmp/after

Each run trains a 2-layer random-init Llama (seeded, SmolLM2's tokenizer) for two steps with `align train
RECIPE --set ...`; `compare` reads every run's metrics.jsonl and summary.json and requires every number and
string to be equal, except timing fields and paths (which differ between two runs of the same code).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ALIGN = str(Path(sys.executable).with_name("align"))
# Keys whose values differ between two identical runs: wall time, throughput, paths, dates; `table` is the
# text rendering of the iterative summaries, whose last column is seconds.
VOLATILE = re.compile(r"time|second|elapsed|wall|per_s|throughput|_dir$|^recipe$|path|date|host|version|^cache|^table$",
                      re.IGNORECASE)

TINY = ["training.max_steps=2", "training.batch_size=4", "training.eval_every=null", "checkpointing.every=1",
        "logging.progress=false", "logging.tensorboard=false", "evaluation.num_prompts=4",
        "evaluation.max_new_tokens=4", "evaluation.batch_size=4", "training.threads=1"]
PAIRWISE = ["data.max_eval_rows=8", "data.max_length=96", "data.max_prompt_length=80"]
RL = ["method.rl.num_generations=4", "method.rl.prompts_per_step=2", "method.rl.max_new_tokens=6",
      "method.rl.generation_batch_size=2"]


def cases(model: str, reward_model: str) -> dict[str, list[str]]:
    """Recipe name -> its overrides. Covers the pairwise trainer (dpo+sft, srpo with revisions), online RL (grpo,
    hapo with adaptive temperature, d3s; rewarded by a tiny reward model) and the iterative loops (apo, curry_dpo)."""
    models = [f"model.name={model}", f"reference.name={model}"]
    apo = ["method.apo.iterations=2", "method.apo.prompts_per_iteration=4", "method.apo.samples_per_prompt=3",
           "method.apo.max_new_tokens=6", "method.apo.generation_batch_size=4", "method.apo.ranker.name=reward_model",
           f"method.apo.ranker.model={reward_model}", "training.num_epochs=1", "training.max_steps=null"]
    # The verifier gives a random model's answers 0 everywhere (zero advantages, zero gradient): score them with
    # the tiny reward model instead, so every group has a spread and the policy moves.
    scored = [f"model.name={model}"] + TINY + RL + ["method.rl.rewards.0.name=reward_model",
                                                   f"method.rl.rewards.0.model={reward_model}"]
    return {
        "dpo": models + TINY + PAIRWISE,
        "srpo": models + TINY + PAIRWISE + ["method.srpo.revisions=1", "data.max_length=128"],
        "grpo": scored,
        "hapo": scored,
        "d3s": scored + ["method.rl.d3s.m_init=2", "method.rl.d3s.m_final=4"],
        "apo": models + TINY + PAIRWISE + apo,
        "curry_dpo": models + TINY + PAIRWISE + ["method.curry_dpo.stages=2"],
    }


def make_models(directory: Path) -> tuple[Path, Path]:
    """The tiny policy and reward model of tests/conftest.py and tests/iterative_fixtures.py, same seeds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from align_cli.builtin_models import builtin_model_dir

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("builtin:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy = directory / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    reward = directory / "tiny-reward"
    LlamaForSequenceClassification(config).save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    return policy, reward


def run_all(directory: Path, only: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    policy, reward = make_models(directory)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, overrides in cases(str(policy), str(reward)).items():
        if only and name not in only:
            continue
        command = [ALIGN, "train", name, "--output-dir", str(directory / name), "--overwrite",
                   *[part for item in overrides for part in ("--set", item)]]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        print(f"{name}: exit {done.returncode}", flush=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            sys.exit(1)


def stable(value, root: str):
    """`value` without its volatile keys (recursively), the check's directory `root` written as <root>."""
    if isinstance(value, dict):
        return {k: stable(v, root) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [stable(v, root) for v in value]
    return value.replace(root, "<root>") if isinstance(value, str) else value


def logged_numbers(run_dir: Path) -> dict:
    """Every metrics.jsonl record and summary.json of a run (iterative runs: of every phase), volatile keys dropped."""
    found = {}
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        found[str(path.relative_to(run_dir))] = [stable(json.loads(line), str(run_dir.parent)) for line in path.read_text().splitlines()]
    for path in sorted(run_dir.rglob("summary.json")):
        found[str(path.relative_to(run_dir))] = stable(json.loads(path.read_text()), str(run_dir.parent))
    return found


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(first: Path, second: Path) -> int:
    failures = 0
    for run in sorted(p.name for p in first.iterdir() if (p / "summary.json").exists()):
        a, b = logged_numbers(first / run), logged_numbers(second / run)
        count = sum(len(v) if isinstance(v, list) else 1 for v in a.values())
        found = differences(a, b)
        print(f"{run}: {'EQUAL' if not found else 'DIFFERENT'} ({len(a)} files, {count} records compared)")
        for line in found[:20]:
            print("   ", line)
        failures += bool(found)
    return 1 if failures else 0


if __name__ == "__main__":
    action, *rest = sys.argv[1:]
    if action == "run":
        run_all(Path(rest[0]), rest[1:])
    elif action == "compare":
        sys.exit(compare(Path(rest[0]), Path(rest[1])))
    else:
        sys.exit(f"unknown action {action}: run DIR [NAMES] | compare DIR DIR")
