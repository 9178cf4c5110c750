"""Multi-GPU evidence: one recipe under 1 GPU, DDP, FSDP2, ZeRO-2, ZeRO-3 and two "nodes" (run_distributed.sh).

`prepare` writes, from a tokenizer directory, everything the runs read: a random-init model of
Qwen2.5-0.5B's shape (SmolLM2's 49k vocabulary, ~0.4B parameters; `--shape 1.5b`: Qwen2.5-1.5B's), a tiny model
of the same family, synthetic preference pairs, and the recipes (the pairwise benchmark profiles its step 4 on
every process; an online GRPO recipe for the DDP run). `report` reads the runs' metrics.jsonl / summary.json
and writes results.json and the loss-curve plot.

The pairs: the prompt lists pseudo-words; the chosen answer repeats them in order, the rejected
answer is other pseudo-words of the same length, so a randomly initialised model can learn the
preference within a few dozen steps and the loss curve has a shape to compare.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = ["ka", "to", "ri", "mu", "sen", "lo", "vi", "dra", "pe", "qua", "zi", "no", "tam", "bel", "gor", "fi"]
BIG = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
           num_key_value_heads=2)  # Qwen2.5-0.5B's shape
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Qwen2.5-1.5B's shape (~1.5B parameters with the 49k vocabulary): compute per GPU outweighs the gradient traffic
SHAPES = {"0.4b": BIG, "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2), "tiny": TINY}
ONLINE_BASELINE = "grpo-1gpu"  # the online recipe's one-GPU run, which the DDP one is compared with
PROFILE_STEP = 4  # `logging.profile_step` of the benchmark runs: the report's `skip`, so it is out of the timing


def pseudo_words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def pairs(rows: int, words_per_prompt: int, seed: int = 0) -> list[dict]:
    vocabulary = pseudo_words(600, seed)
    rng = random.Random(seed + 1)
    out = []
    for _ in range(rows):
        shown = rng.sample(vocabulary, words_per_prompt)
        other = rng.sample([w for w in vocabulary if w not in shown], words_per_prompt)
        out.append({"prompt": "Repeat these words in order: " + " ".join(shown),
                    "chosen": " ".join(shown), "rejected": " ".join(other)})
    return out


def save_model(directory: Path, tokenizer_dir: Path, shape: dict, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=1_000_000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def recipe(model: Path, data: Path, profile_step: int | None = None, **training) -> dict:
    return {
        "model": {"name": str(model), "dtype": "float32"},
        "data": {"train": {"source": str(data)}, "eval_fraction": 0.03, "max_eval_rows": 32, "max_length": 384,
                 "max_prompt_length": 192, "num_proc": 1},
        "method": {"name": "dpo", "losses": [{"name": "dpo", "beta": 0.1}]},
        "training": {"learning_rate": 1e-5, "lr_scheduler": "constant_with_warmup", "warmup_steps": 2, "seed": 1,
                     "precision": "bf16", "max_grad_norm": 1.0, **training},
        "logging": {"progress": False, "tensorboard": False, "profile_step": profile_step},
        "checkpointing": {"every": None, "keep_last": 1},
        "evaluation": {"task": None},
    }


def online_recipe(model: Path, steps: int, prompts_per_step: int = 8) -> dict:
    """GRPO on the shipped arithmetic prompts (grpo.yaml's loss and G = 8, 64 new tokens at T = 1), rewarded
    1 for a completion with a digit in it, which a random-init model sometimes writes: groups have rewards to
    normalise, so the update has a gradient for DDP to average."""
    return {
        "model": {"name": str(model), "dtype": "float32"},
        "data": {"train": {"source": "builtin:arithmetic_prompts", "split": "train"}, "max_length": 192,
                 "max_prompt_length": 96},
        "method": {"name": "grpo", "losses": [{"name": "grpo", "eps_low": 0.2, "eps_high": 0.2, "kl_beta": 0.0}],
                   "rl": {"num_generations": 8, "prompts_per_step": prompts_per_step, "max_new_tokens": 64,
                          "temperature": 1.0, "rewards": [{"name": "format", "pattern": "(?s).*[0-9].*"}]}},
        "training": {"learning_rate": 1e-6, "lr_scheduler": "constant", "warmup_ratio": 0.0, "batch_size": 16,
                     "max_steps": steps, "seed": 1, "precision": "bf16", "max_grad_norm": 1.0},
        "logging": {"progress": False, "tensorboard": False},
        "checkpointing": {"every": None, "keep_last": 1},
        "evaluation": {"task": None},
        "output": {"save_final_model": False},
    }


def prepare(out: Path, tokenizer_dir: Path, steps: int, global_batch: int, shape: dict = BIG) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(int(steps * global_batch * 1.1) + 40, 48)))
    save_model(out / "model", tokenizer_dir, shape, seed=0)
    save_model(out / "tiny", tokenizer_dir, TINY, seed=0)
    (out / "bench.yaml").write_text(yaml.safe_dump(recipe(out / "model", data, max_steps=steps,
                                                          profile_step=PROFILE_STEP if steps > PROFILE_STEP else None)))
    # The online loop under DDP: 6 steps of 8 prompts x 8 samples per process (1 GPU: --set 16 prompts)
    (out / "grpo.yaml").write_text(yaml.safe_dump(online_recipe(out / "model", steps=6)))
    # Resume and LoRA checks: 4 steps, checkpoints at 2 and 4; constant LR so a 2-step run resumed to 4
    # follows the same schedule as a straight 4-step run.
    tiny = recipe(out / "tiny", data, max_steps=4, batch_size=4, learning_rate=1e-4, lr_scheduler="constant",
                  warmup_steps=0)
    tiny["checkpointing"] = {"every": 2, "keep_last": 2}
    tiny["data"]["train"]["max_rows"] = 200
    (out / "tiny.yaml").write_text(yaml.safe_dump(tiny))


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def steady_throughput(records: list[dict], train_tokens: int | None, skip: int) -> float | None:
    """Tokens per second from the end of step `skip` (past compilation and autotuning) to the last step,
    by the wall-clock stamps of the logged steps. Every run sees the same rows at the same step, so the
    ratio of two runs' throughputs is the ratio of their times for the same work."""
    if not train_tokens or len(records) <= skip + 1:
        return None
    stamps = {r["step"]: r["time"] for r in records}
    last = max(stamps)
    seconds = stamps[last] - stamps[skip]
    return train_tokens / len(records) * (last - skip) / seconds if seconds > 0 else None


def report(out: Path, runs: list[str], baseline: str, skip: int, checks: list[str]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict = {"runs": {}, "checks": {}}
    curves = {}
    for name in runs:
        run_dir = out / "runs" / name
        records = train_records(run_dir)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        curves[name] = {r["step"]: r["loss"] for r in records}
        checkpoints = run_dir / "checkpoints"
        results["runs"][name] = {
            "completed": summary_path.exists(),
            "steps": len(records),
            "losses": [round(r["loss"], 5) for r in records],
            "train_tokens": summary.get("train_tokens", summary.get("completion_tokens")),  # online: generated
            "steady_tokens_per_second": steady_throughput(records, summary.get("train_tokens",
                                                                               summary.get("completion_tokens")), skip),
            "eval_loss_before": (summary.get("before") or {}).get("loss"),
            "eval_loss_after": (summary.get("after") or {}).get("loss"),
            "final_model": (run_dir / "final_model" / "config.json").exists(),
            "checkpoints": sorted(p.name for p in checkpoints.glob("step-*")) if checkpoints.exists() else [],
            "profile": step_profiles(run_dir),
            "median_step_seconds": _median([r["step_seconds"] for r in records if "step_seconds" in r][1:]),
            "median_generation_seconds": _median([r["generation_seconds"] for r in records
                                                  if "generation_seconds" in r][1:]),
        }
    for name, entry in results["runs"].items():
        reference = ONLINE_BASELINE if name.startswith("grpo") else baseline  # the online runs: against theirs
        base = curves.get(reference, {})
        base_speed = results["runs"].get(reference, {}).get("steady_tokens_per_second")
        shared = sorted(set(curves[name]) & set(base))
        entry["baseline"] = reference
        entry["max_abs_loss_diff_vs_baseline"] = max((abs(curves[name][s] - base[s]) for s in shared), default=None)
        speed = entry["steady_tokens_per_second"]
        entry["speedup_vs_baseline"] = speed / base_speed if speed and base_speed else None
    base = curves.get(baseline, {})
    curves = {name: curve for name, curve in curves.items() if not name.startswith("grpo")}  # another loss
    for name in checks:
        path = out / "checks" / f"{name}.json"
        results["checks"][name] = json.loads(path.read_text()) if path.exists() else {"completed": False}

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, curve) in enumerate(curves.items()):
        steps = sorted(curve)
        if not steps:
            continue
        style = {"label": name, "color": colours[index % len(colours)], "linewidth": 1.2}
        left.plot(steps, [curve[s] for s in steps], marker="o", markersize=2.5, **style)
        if name != baseline:
            shared = [s for s in steps if s in base]
            right.plot(shared, [max(abs(curve[s] - base[s]), 1e-7) for s in shared], **style)
    left.set(xlabel="optimiser step", ylabel="DPO loss (mean over the global batch)", title="Same recipe, same global batch")
    right.set(xlabel="optimiser step", ylabel=f"|loss - loss({baseline})|", title="Difference from one GPU")
    right.set_yscale("log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "distributed_loss_curves.png", dpi=120)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def step_profiles(run_dir: Path) -> dict:
    """Per process, the profiled step's wall time and where it went (align_cli/profiling.py's groups), with the
    share of the wall time spent in collectives: what tells a scaling gap's cause."""
    profiles = {}
    for path in sorted((run_dir / "profile").glob("step-*-rank*.json")):
        summary = json.loads(path.read_text())
        wall, groups = summary["wall_s"], summary["groups_s"]
        profiles[path.stem.split("-")[-1]] = {
            "step": int(path.stem.split("-")[1]), "wall_s": wall, "measured": summary["measured"], "groups_s": groups,
            "communication_share": round(groups.get("communication", 0.0) / wall, 3) if wall else None,
            "top": summary["top"][:8]}
    return profiles


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def check(out: Path, name: str, straight: Path, resumed: Path | None, lora: Path | None) -> None:
    """Resume and LoRA checks of one engine (tiny model) -> checks/NAME.json."""
    import torch
    from transformers import AutoModelForCausalLM

    result: dict = {"engine": name}
    if straight is not None and (straight / "final_model").exists():
        result["straight_losses"] = [round(r["loss"], 6) for r in train_records(straight)]
    if resumed is not None and (resumed / "final_model").exists():
        records = train_records(resumed)
        result["resumed_steps"] = [r["step"] for r in records]
        result["resumed_losses"] = [round(r["loss"], 6) for r in records]
        a, b = _final_weights(straight / "final_model"), _final_weights(resumed / "final_model")
        result["resume_weight_diff_over_update"] = _difference_over_update(b, a, _final_weights(out / "tiny"))
        result["resume_same_keys"] = sorted(a) == sorted(b)
    if lora is not None and (lora / "final_model").exists():
        model = AutoModelForCausalLM.from_pretrained(lora / "final_model", dtype=torch.float32)
        names = [n for n, _ in model.named_parameters()]
        summary = json.loads((lora / "summary.json").read_text())
        result["lora_final_model_loads"] = True
        result["lora_final_has_adapter_keys"] = any("lora" in n for n in names)
        result["lora_reference"] = summary.get("reference")
        result["lora_margins_before_after"] = [summary["before"].get("rewards/margins"), summary["after"].get("rewards/margins")]
        result["lora_losses"] = [round(r["loss"], 6) for r in train_records(lora)]
        base = _final_weights(out / "tiny")
        merged = _final_weights(lora / "final_model")
        result["lora_merged_keys_match_base"] = sorted(merged) == sorted(base)
        result["lora_merged_update_norm"] = sum(float((merged[k].float() - base[k].float()).norm() ** 2)
                                                for k in merged if k in base) ** 0.5
    result["completed"] = "resume_weight_diff_over_update" in result and "lora_final_model_loads" in result
    (out / "checks").mkdir(exist_ok=True)
    (out / "checks" / f"{name}.json").write_text(json.dumps(result, indent=2))


def _final_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def _difference_over_update(a: dict, b: dict, initial: dict) -> float:
    """||a - b|| / ||b - initial|| over all weights: the share of the training update on which two final
    models disagree (0: identical; bf16 rounding gives ~1e-2)."""
    difference = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in b)
    update = sum(float((b[k].float() - initial[k].float()).norm() ** 2) for k in b if k in initial)
    return (difference / update) ** 0.5 if update > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.4b", help="the benchmark model's shape")
    p.add_argument("--tiny", action="store_true", help="--shape tiny (CPU smoke runs)")
    r = commands.add_parser("report")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--runs", nargs="+", required=True)
    r.add_argument("--baseline", default="1gpu")
    r.add_argument("--skip", type=int, default=4)
    r.add_argument("--checks", nargs="*", default=[])
    c = commands.add_parser("check")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--straight", type=Path, required=True)
    c.add_argument("--resumed", type=Path)
    c.add_argument("--lora", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.tokenizer, args.steps, args.global_batch, SHAPES["tiny" if args.tiny else args.shape])
    elif args.command == "check":
        check(args.out, args.name, args.straight, args.resumed, args.lora)
    else:
        print(json.dumps(report(args.out, args.runs, args.baseline, args.skip, args.checks), indent=2))


if __name__ == "__main__":
    main()
