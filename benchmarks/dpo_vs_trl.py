"""Benchmark: DPO training steps, TRL 1.16 DPOTrainer against ours, same GPU, same work (not a test).

    python benchmarks/dpo_vs_trl.py [--out DIR] [--quick] [--deadline SECONDS] [--only ...] [--variants ...]
        [--repeat N] [--profile-step K] [--memory-peak]

Models are random-init from config only (Qwen2.5-0.5B and Llama-3.2-1B shapes, bf16 weights). Data
is synthetic: prompt 64-512 tokens, chosen and rejected 32-1024 each (uniform, random token ids, an
end token last), written as text of one word per token id for TRL's tokenizer, so both trainers see
exactly the same token ids. Same global batch (8 pairs), max length (1536), bf16, optimizer (torch
AdamW, lr 1e-5 constant, betas 0.9/0.999, no weight decay, clip 1.0), DPO sigmoid loss, beta 0.1, the
same batches in the same order (TRL's sampler made sequential), same initial weights.

  trl           DPOTrainer, its defaults: fused LM head, gradient checkpointing, reference model copy
                (handed to it as `ref_model`: it would reload one from the model's path, which a
                random-init model lacks)
  ours          our default on GPU: packed rows (attention align_packed: per shape bucket FlexAttention's block mask,
                flash varlen or the padded batch, whichever measured fastest), prompt shared by chosen and rejected, fused log-prob
                kernel, live reference run without autograd on the same packed row; gradient checkpointing on (as
                TRL). A row's `attention` lists align_packed's decisions (attention_choice.py)
  ours flex / ours varlen / ours padded   ours with the backend forced (model.attn_implementation: align_flex /
                align_varlen / align_padded), also compiled: the fixed-length rows only
  ours cached   the same with reference log-probs precomputed to the disk cache (reference model freed)
  trl cached    DPOTrainer with precompute_ref_log_probs (no reference model kept)
  ours liger    ours with training.liger_kernels: true (Liger-Kernel's fused RMSNorm, rotary embedding and
                SiLU-and-multiply in the eager layers, policy and reference; what `training.compile: false` runs by
                default on CUDA when liger-kernel is installed)
  ours compile  ours with training.compile (torch.compile of each decoder layer); also cached, and
                without activation checkpointing. Since `training.compile: auto` (issue 18), "ours compile" is
                what `align train` runs on CUDA by default; "ours" is `training.compile: false` and
                `training.liger_kernels: false`
  ours opt-in-bwd   ours with training.optimizer_in_backward (each parameter's AdamW step inside backward, its
                gradient freed; torch AdamW's fused kernel). It cannot clip (docs/throughput.md), so these rows
                run without clip 1.0, unlike every other row
  ours offload  ours with training.offload_activations (checkpointed layer inputs in pinned CPU memory)
  ours opt-in-bwd+offload   both. Each of the three also cached, and both also compiled (Llama-3.2-1B shape
                only; --quick: uncompiled). Pinned host memory is not in the GPU peak, which is the point
  ours ref-offload   ours with reference.offload (the live reference's weights in pinned host memory, on the GPU
                only for its forward, the copy overlapping the policy's forward); also with opt-in-bwd+offload, and
                compiled
  ours chunked  ours with training.mlp_chunk_tokens: 2048 (each decoder MLP over checkpointed chunks of
                tokens); also with both levers above ("opt-in-bwd+offload+chunked", and "...chunked1024" with 1024),
                cached and compiled

Tokens/s counts the tokens of the chosen and rejected sequences as TRL runs them (prompt + completion
of each, no padding): the same number for every trainer on the same batches. MFU = F x tokens/s /
989e12 (H100 bf16 dense peak) with F = 8N per token when a reference forward runs (6N policy + 2N
reference) and 6N with cached reference log-probs; N counts every parameter once (tied embeddings
once). Ours also reports `run tok/s`, the tokens it actually ran (each prompt once). Peak memory is the
maximum allocated by torch during the run (weights, reference, optimizer states, activations), less
what was allocated before it started. Times are per optimizer step with a CUDA sync; a run is warm-up
steps, then 3 windows over the same unique batches; the table reports the median window. --memory-peak runs
the unique batches once more after the timed steps, recording every CUDA allocation (Python stacks), and puts
what was live at that pass's peak, by the line that allocated it, in the JSONL's `memory_peak`
(align_cli/profiling.py `peak_breakdown`); those steps count in no time or loss (the batches, so the peak, are the same).

Scaling: Qwen shape, prompt 256, chosen = rejected length L in {256, 1024, 4096}, 4 pairs per step, and
L = 16384 with 2 pairs per step (66k packed tokens; TRL pads each sequence to 16640).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import zlib

import torch

from align_cli.liger_kernels import restore_rotary
from align_cli.profiling import MemoryPeak, StepProfiler

PEAK_FLOPS = 989e12
PAD, EOS, UNK = 0, 1, 2

SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
TINY = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


# ----------------------------------------------------------------------------------------------- data


def synthetic_pairs(count: int, vocab: int, seed: int, prompt=(64, 512), completion=(32, 1024), fixed=None):
    """Pairs of token ids; `fixed=(prompt, completion)` gives exact lengths (scaling runs)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(bounds, exact):
        length = (
            exact
            if exact is not None
            else int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))
        )
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    rows = []
    for i in range(count):
        prompt_ids = draw(prompt, fixed and fixed[0])
        chosen = draw(completion, fixed and fixed[1] - 1) + [EOS]
        rejected = draw(completion, fixed and fixed[1] - 1) + [EOS]
        rows.append(
            {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "row_index": i}
        )
    return rows


def sequence_tokens(rows) -> int:
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def word_tokenizer(vocab: int):
    """One word per token id (`t123`), so TRL's text pipeline reproduces our ids exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def as_text(ids) -> str:
    return " ".join("<eos>" if i == EOS else f"t{i}" for i in ids)


# --------------------------------------------------------------------------------------------- models


def build_model(shape: dict, device, dtype, attention: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(shape)
    config = AutoConfig.for_model(
        settings.pop("model_type"), **settings, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS
    )
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attention} if attention else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model


def parameter_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_baseline(device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory(device, baseline: int) -> float:
    return (torch.cuda.max_memory_allocated() - baseline) / 2**30 if device.type == "cuda" else float("nan")


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(
    spec: dict, schedule: list[list[dict]], settings: dict, device, dtype, *, cached: bool = False,
    profile_step: int | None = None, memory_steps: tuple[int, int] | None = None,
) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class SequentialDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    times, losses = [], []
    profiler = StepProfiler(profile_step)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            profiler.begin(len(times))
            recorder.begin(len(times))
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.started)
            profiler.end(len(times) - 1)
            recorder.end(len(times) - 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    baseline = memory_baseline(device)
    recorder = MemoryPeak(*(memory_steps or (None,)), baseline=baseline)
    model = build_model(spec["shape"], device, dtype)
    rows = [row for batch in schedule for row in batch]
    dataset = Dataset.from_list(
        [
            {
                "prompt": as_text(r["prompt_ids"]),
                "chosen": " " + as_text(r["chosen_ids"]),
                "rejected": " " + as_text(r["rejected_ids"]),
            }
            for r in rows
        ]
    )
    output = tempfile.mkdtemp(prefix="trl-bench-")
    config = DPOConfig(
        output_dir=output,
        per_device_train_batch_size=settings["pairs"],
        gradient_accumulation_steps=1,
        max_steps=len(schedule),
        learning_rate=settings["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=settings["checkpointing"],
        max_length=settings["max_length"],
        beta=0.1,
        loss_type=["sigmoid"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        disable_dropout=True,
        use_cpu=device.type == "cpu",
        precompute_ref_log_probs=cached,
        precompute_ref_batch_size=settings["pairs"],
    )
    # TRL would rebuild the reference from the model's path; a random-init model has none, so hand it the
    # copy it would have built (same weights, same dtype, frozen under no_grad by TRL). With precomputed
    # log-probs TRL keeps no reference model and scores with the policy before training.
    reference = None if cached else copy.deepcopy(model)
    trainer = SequentialDPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=dataset,
        processing_class=word_tokenizer(spec["shape"]["vocab_size"]),
        callbacks=[Clock()],
    )
    parameters = parameter_count(model)
    del reference
    trainer.train()
    peak = peak_memory(device, baseline)
    del trainer, model
    return {"times": times, "losses": losses, "peak_gib": peak, "parameters": parameters,
            "profile": profiler.summary, "memory_peak": recorder.summary}


# ----------------------------------------------------------------------------------------------- ours


def run_ours(
    spec: dict,
    schedule: list[list[dict]],
    settings: dict,
    device,
    dtype,
    *,
    cached: bool,
    checkpointing: bool = True,
    compile_model: bool = False,
    liger: bool = False,
    in_backward: bool = False,
    offload: bool = False,
    mlp_chunk: int | None = None,
    reference_offload: bool = False,
    attention: str | None = None,
    profile_step: int | None = None,
    memory_steps: tuple[int, int] | None = None,
) -> dict:
    from accelerate import Accelerator

    from align_cli.activation_offload import ActivationOffload
    from align_cli.attention_choice import CHOOSER, attention_report
    from align_cli.compilation import compile_layers
    from align_cli.config import LossTerm, TrainingConfig
    from align_cli.liger_kernels import use_liger_kernels
    from align_cli.models import freeze
    from align_cli.optimizer_in_backward import AdamWInBackward
    from align_cli.packed_attention import register_backend
    from align_cli.pairwise.objective import Objective, objective_forward
    from align_cli.pairwise.reference import LiveReference, cached_or_computed
    from align_cli.pairwise.throughput import collate_for
    from align_cli.reference_offload import HostResidentWeights
    from align_cli.run_setup import prepare_for_backward

    training = TrainingConfig(
        packing=True,
        share_prompt=True,
        gradient_checkpointing=checkpointing,
        compile=compile_model,
        liger_kernels=liger,
        learning_rate=settings["lr"],
        batch_size=settings["pairs"],
        optimizer_in_backward=in_backward,
        max_grad_norm=None if in_backward else 1.0,  # the one semantic difference of those rows
        offload_activations=offload,
        mlp_chunk_tokens=mlp_chunk,
    )
    baseline = memory_baseline(device)
    default = register_backend() if device.type == "cuda" else "sdpa"  # align_packed: measured per bucket
    CHOOSER.clear()  # this row's decisions only
    model = build_model(spec["shape"], device, dtype, attention or default)
    parameters = parameter_count(model)
    # checkpointing, Liger's kernels and MLP chunks, as run_setup.prepare_run does
    prepare_for_backward(model, training, {"enabled": liger})
    reference_model = freeze(copy.deepcopy(model))
    if liger:
        use_liger_kernels(reference_model)
    if compile_model:
        compile_layers(model)
        if not cached:  # a precomputed reference runs once: not worth compiling
            compile_layers(reference_model)
    objective = Objective([LossTerm(name="dpo", beta=0.1)])
    collate = collate_for(training)
    host_weights = HostResidentWeights(reference_model, device) if reference_offload else None
    context = host_weights.resident if host_weights is not None else contextlib.nullcontext  # as run_setup does
    live = LiveReference(reference_model, context, True, objective.reference_groups, collate, host_weights)
    accelerator = Accelerator(
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no", cpu=device.type == "cpu"
    )
    precompute_seconds = None
    if cached:
        unique = {r["row_index"]: r for batch in schedule for r in batch}
        dataset = [unique[i] for i in range(len(unique))]
        started = time.perf_counter()
        reference, _ = cached_or_computed(
            live,
            dataset,
            list(range(len(dataset))),
            PAD,
            settings["pairs"],
            device,
            f"bench-{time.time_ns()}",
            tempfile.mkdtemp(prefix="ref-cache-"),
        )
        sync(device)
        precompute_seconds = time.perf_counter() - started
        del live, reference_model
        baseline = memory_baseline(device) - parameter_bytes(model)  # the policy stays counted
    else:
        reference = live
    optimizer = (AdamWInBackward if in_backward else torch.optim.AdamW)(
        [p for p in model.parameters() if p.requires_grad],
        lr=training.learning_rate,
        betas=training.adam_betas,
        weight_decay=training.weight_decay,
    )
    stepper = optimizer if in_backward else None  # as the trainer keeps it: the optimiser inside backward
    model, optimizer = accelerator.prepare(model, optimizer)
    offloading = ActivationOffload(model) if offload else None
    model.train()
    times, losses, run_tokens = [], [], []
    profiler = StepProfiler(profile_step)
    recorder = MemoryPeak(*(memory_steps or (None,)), baseline=baseline)
    for step, rows in enumerate(schedule):
        sync(device)
        profiler.begin(step)
        recorder.begin(step)
        started = time.perf_counter()
        batch = collate(rows, objective.policy_groups, PAD).to(device)
        try:
            loss, _, _ = objective_forward(model, batch, objective, reference, training.fused_logprobs)
            if stepper is not None:
                stepper.begin_backward(stepping=True)
            accelerator.backward(loss)
        except Exception as error:  # noqa: BLE001 - a failure while recording keeps the timed steps' results
            if not recorder.recording:
                raise
            recorder.fail(error)
            break
        if stepper is not None:
            stepper.end_backward()  # every parameter has stepped; the norm, as the trainer reads it
        else:
            accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        sync(device)
        times.append(time.perf_counter() - started)
        profiler.end(step)
        recorder.end(step)
        run_tokens.append(int(batch.sequences.attention_mask.sum()))
    peak = peak_memory(device, baseline)
    if stepper is not None:
        stepper.remove_hooks()
    offloaded = offloading.report() if offloading is not None else None
    if offloading is not None:
        offloading.remove()
    del model, optimizer, reference, stepper
    return {
        "times": times,
        "losses": losses,
        "peak_gib": peak,
        "parameters": parameters,
        "run_tokens": run_tokens,
        "precompute_seconds": precompute_seconds,
        "offloaded": offloaded,
        "attention": attention_report(),
        "profile": profiler.summary,
        "memory_peak": recorder.summary,
    }


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------------------- summary


def summarise(name: str, result: dict, schedule, warmup: int, unique: int, flops_per_param: int) -> dict:
    tokens = [sequence_tokens(rows) for rows in schedule]

    def window_rates(counts):
        rates = []
        for start in range(warmup, len(schedule), unique):
            stop = start + unique
            if stop <= len(result["times"]):
                rates.append(sum(counts[start:stop]) / sum(result["times"][start:stop]))
        return rates

    windows = window_rates(tokens)
    tokens_per_second = statistics.median(windows) if windows else float("nan")
    summary = {
        "name": name,
        "tokens_per_second": tokens_per_second,
        "windows": windows,
        "mfu": flops_per_param * result["parameters"] * tokens_per_second / PEAK_FLOPS,
        "flops_per_token": f"{flops_per_param}N",
        "peak_gib": result["peak_gib"],
        "loss_first": result["losses"][0] if result["losses"] else None,
        "loss_last": result["losses"][-1] if result["losses"] else None,
        "losses": result["losses"],
        "step_seconds": result["times"],
        "parameters": result["parameters"],
    }
    if result.get("profile"):  # --profile-step: that step's kernels (align_cli/profiling.py)
        summary["profile"] = result["profile"]
    if result.get("memory_peak"):  # --memory-peak: what was live at the recorded pass's peak
        summary["memory_peak"] = result["memory_peak"]
    if result.get("run_tokens"):  # the same windows, counting the tokens ours ran (each prompt once)
        summary["run_tokens_per_second"] = statistics.median(window_rates(result["run_tokens"]))
        summary["precompute_seconds"] = result.get("precompute_seconds")
        summary["offloaded"] = result.get("offloaded")  # tensors and bytes the last forward offloaded
        summary["attention"] = result.get("attention")  # align_packed's measured choices
    return summary


def versions() -> dict:
    import accelerate
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC"),
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("triton", "liger-kernel"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def table(results: list[dict]) -> str:
    lines = [
        ("| experiment | trainer | tokens/s | vs TRL | MFU | F/token | peak GiB | vs TRL | loss step 1 | "
        "loss last | run tok/s | windows tok/s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # each row against TRL of its own round (--repeat), else of its experiment's first round
    baselines = {(r["experiment"], r.get("round", 0)): r for r in results if r["name"] == "trl" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['experiment']} | {r['name']} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        base = baselines.get((r["experiment"], r.get("round", 0)), baselines.get((r["experiment"], 0)))
        speed = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else ""
        memory = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else ""
        run = f"{r['run_tokens_per_second']:.0f}" if "run_tokens_per_second" in r else ""
        windows = " / ".join(f"{w / 1e3:.1f}k" for w in r["windows"])
        lines.append(
            f"| {r['experiment']} | {r['name']} | {r['tokens_per_second']:.0f} | {speed} | "
            f"{100 * r['mfu']:.1f}% | {r['flops_per_token']} | {r['peak_gib']:.2f} | {memory} | "
            f"{r['loss_first']:.4f} | {r['loss_last']:.4f} | {run} | {windows} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, few steps, fp32")
    parser.add_argument(
        "--deadline", type=float, default=float("inf"), help="skip experiments after this many s"
    )
    parser.add_argument("--only", default=None, help="comma-separated experiment names")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (e.g. 'trl,ours opt-in-bwd')")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each experiment's variants this many rounds, interleaved (a row's `round` says "
                             "which), for medians over runs in one process")
    parser.add_argument("--profile-step", type=int, default=None,
                        help="profile this step (0-based) of every variant: its CUDA kernels, in the JSONL's 'profile'")
    parser.add_argument("--memory-peak", action="store_true",
                        help="one more pass over the unique batches, after the timed steps, with every CUDA "
                             "allocation recorded: what was live at its peak, in the JSONL's 'memory_peak'")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    info = versions()
    print(json.dumps(info), flush=True)
    started = time.time()
    warmup, unique, windows = (2, 4, 3) if not args.quick else (1, 2, 1)

    experiments = []  # (experiment, shape, pairs, max_length, data kwargs, variants)
    main_variants = [
        ("trl", {}),
        ("ours", {"cached": False}),
        ("ours liger", {"cached": False, "liger": True}),
        ("ours cached", {"cached": True}),
        ("trl cached", {"cached": True}),
    ]
    memory_variants = [  # issue 18's memory levers, with and without the cached reference and compilation
        (f"ours{' compile' if compiled_ else ''} {lever}{' cached' if cached else ''}",
         {"cached": cached, "compile_model": compiled_, **options})
        for compiled_ in (False, True)
        for lever, options in (("opt-in-bwd", {"in_backward": True}), ("offload", {"offload": True}),
                               ("opt-in-bwd+offload", {"in_backward": True, "offload": True}),
                               ("chunked", {"mlp_chunk": 2048}),
                               ("opt-in-bwd+offload+chunked", {"in_backward": True, "offload": True,
                                                               "mlp_chunk": 2048}),
                               ("opt-in-bwd+offload+chunked1024", {"in_backward": True, "offload": True,
                                                                   "mlp_chunk": 1024}),
                               ("ref-offload", {"reference_offload": True}),
                               ("opt-in-bwd+offload+ref-offload", {"in_backward": True, "offload": True,
                                                                   "reference_offload": True}))
        for cached in (False, True)
        if (not compiled_ or lever.startswith("opt-in-bwd+offload") or lever == "ref-offload")
        and not (cached and "ref-offload" in lever)  # a cached reference has no model to offload
    ]
    if args.quick:  # the memory rows too, uncompiled (inductor's CPU build is slow)
        quick_variants = main_variants + [v for v in memory_variants if not v[1]["compile_model"]]
        experiments.append(("tiny", TINY, 4, 256, {"prompt": (8, 64), "completion": (4, 128)}, quick_variants))
    else:
        for shape in ("qwen2.5-0.5b", "llama-3.2-1b"):
            experiments.append((shape, SHAPES[shape], 8, 1536, {}, main_variants))
        compiled = [
            ("ours compile", {"cached": False, "compile_model": True}),
            ("ours compile cached", {"cached": True, "compile_model": True}),
        ]
        experiments[0] = experiments[0][:5] + (main_variants + compiled,)
        experiments[1] = experiments[1][:5] + (
            main_variants
            + compiled
            + [("ours compile no-ckpt", {"cached": False, "compile_model": True, "checkpointing": False})]
            + memory_variants,
        )
        forced = [  # the fixed-length rows with each packed-row backend forced, uncompiled and compiled
            (f"ours{' compile' if compiled_ else ''} {backend}",
             {"cached": False, "compile_model": compiled_, "attention": f"align_{backend}"})
            for backend in ("flex", "varlen", "padded")
            for compiled_ in (False, True)
        ]
        for length, pairs in ((4096, 4), (16384, 2), (1024, 4), (256, 4)):
            experiments.append(
                (
                    f"qwen2.5-0.5b L={length}",
                    SHAPES["qwen2.5-0.5b"],
                    pairs,
                    256 + length,
                    {"fixed": (256, length)},
                    [
                        ("trl", {}),
                        ("ours", {"cached": False}),
                        ("ours liger", {"cached": False, "liger": True}),
                        ("ours compile", {"cached": False, "compile_model": True}),
                    ]
                    + (forced if length >= 4096 else []),
                )
            )
    if args.only:
        wanted = set(args.only.split(","))
        experiments = [e for e in experiments if e[0] in wanted]
    if args.variants:
        chosen = set(args.variants.split(","))
        experiments = [e[:5] + ([v for v in e[5] if v[0] in chosen],) for e in experiments]

    results = []
    path = os.path.join(args.out, "dpo_vs_trl.jsonl")
    for experiment, shape, pairs, max_length, data, variants in experiments:
        rows = synthetic_pairs(
            unique * pairs, shape["vocab_size"], seed=zlib.crc32(experiment.encode()), **data
        )
        batches = [rows[i * pairs : (i + 1) * pairs] for i in range(unique)]
        timed = warmup + unique * windows
        schedule = [batches[k % unique] for k in range(timed + (unique if args.memory_peak else 0))]
        memory_steps = (timed, timed + unique - 1) if args.memory_peak else None
        settings = {"pairs": pairs, "max_length": max_length, "lr": 1e-6, "checkpointing": True}
        for round_, (name, options) in ((r, v) for r in range(args.repeat) for v in variants):
            if time.time() - started > args.deadline:
                print(f"deadline: skipping {experiment} / {name}", flush=True)
                continue
            spec = {"shape": shape}
            print(f"== {experiment} / {name}", flush=True)
            begun = time.time()
            try:
                run = run_trl if name.startswith("trl") else run_ours
                result = run(spec, schedule, settings, device, dtype, profile_step=args.profile_step,
                             memory_steps=memory_steps, **options)
                for key in ("times", "losses", "run_tokens"):  # the recorded pass counts in no rate or loss
                    if key in result:
                        result[key] = result[key][:timed]
                flops = 6 if options.get("cached") else 8
                summary = summarise(name, result, schedule[:timed], warmup, unique, flops)
            except Exception as error:  # noqa: BLE001 -- one failed variant must not lose the others
                traceback.print_exc()
                summary = {"name": name, "error": f"{type(error).__name__}: {error}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:  # "ours liger" replaced transformers' rotary function process-wide; the next row is anyone's
                restore_rotary()
            summary.update(
                experiment=experiment,
                round=round_,
                pairs=pairs,
                max_length=max_length,
                wall_seconds=round(time.time() - begun, 1),
            )
            results.append(summary)
            with open(path, "a") as handle:
                handle.write(json.dumps(summary) + "\n")
            if "error" not in summary:
                print(
                    f"   {summary['tokens_per_second']:.0f} tok/s, MFU {100 * summary['mfu']:.1f}%, "
                    f"peak {summary['peak_gib']:.2f} GiB, loss {summary['loss_first']:.4f} -> "
                    f"{summary['loss_last']:.4f}, steps {[round(t, 3) for t in summary['step_seconds']]}, "
                    f"{summary['wall_seconds']} s",
                    flush=True,
                )
    markdown = table(results)
    with open(os.path.join(args.out, "dpo_vs_trl.md"), "w") as handle:
        handle.write(json.dumps(info) + "\n\n" + markdown + "\n")
    print(markdown)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
