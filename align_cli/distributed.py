"""Running one recipe unchanged on several processes: DDP, FSDP2 and DeepSpeed ZeRO through Accelerate.

What the engines need beyond `accelerator.prepare`:
- DeepSpeed reads batch size and clipping from its own config: `configure_engine` fills them from the recipe.
- The frozen reference model is sharded like the policy under FSDP2 and ZeRO-3 (never a full replica per
  GPU there) and kept as a replica, under the same autocast as the policy, elsewhere: `prepare_reference`.
- A LoRA model is merged for the final save from the gathered state dict when the live parameters are
  shards: `merge_lora_state_dict`.
- Token-mean losses divide by the token count of the global batch: `global_token_mean`.
- `align train --accelerate-config NAME --num-processes N` relaunches itself through `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import torch

from .errors import UserError


def engine_name(accelerator) -> str:
    """'single', 'ddp', 'fsdp2', 'fsdp1', 'zero0'..'zero3' (or the distributed type's name)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind == "DEEPSPEED":
        return f"zero{deepspeed_stage(accelerator)}"
    if kind == "FSDP":
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    if accelerator.num_processes == 1:
        return "single"
    return "ddp" if kind.startswith("MULTI_") else kind.lower()


def requested_sharding_engine() -> str | None:
    """The sharding engine `accelerate launch` set this process up for, read from the environment it exports
    (as the Accelerator will read it): 'DeepSpeed', 'FSDP', or None for one process or DDP."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def deepspeed_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def shards_parameters(accelerator) -> bool:
    """True where no process holds all parameters (FSDP, ZeRO-3): models must be called through their
    wrappers' hooks, and every process must run the same number of forwards."""
    return engine_name(accelerator) in ("fsdp1", "fsdp2", "zero3")


def configure_engine(accelerator, recipe) -> None:
    """What the engine takes from the run before `prepare`: FSDP2's mixed precision policy; the DeepSpeed config's
    batch size and clipping from the recipe (no data loader tells it the batch size)."""
    if engine_name(accelerator) == "fsdp2":
        accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp2_mixed_precision(accelerator.mixed_precision)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    training = recipe.training
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = training.batch_size
    config["train_batch_size"] = training.batch_size * training.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    config["gradient_clipping"] = float(training.max_grad_norm or 0.0)
    if plugin.zero_stage == 3:
        # The final model is written as one Hugging Face directory: gather the 16-bit weights to rank 0.
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def fsdp2_mixed_precision(mixed_precision: str):
    """FSDP2's policy for `training.precision`: each unit gathers its parameters in the 16-bit dtype, reduces the
    gradients in fp32 onto the fp32 master weights, and leaves its outputs in the dtype they were computed in.
    Accelerate's policy for "bf16" also casts every unit's outputs, the LM head's included: the fp32 per-token
    log-probs the head computes (`logprobs.sequence_logps`) would be rounded to bf16 (8 bits, ~0.03 on a log-prob
    of -10), and the gradients are reduced in bf16. None (no casts) in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None)


def prepare_reference(accelerator, reference, policy, context_factory):
    """The frozen reference ready to run beside the prepared policy; returns (model, context factory).

    - the policy itself (LoRA with adapters disabled): already prepared; under FSDP2 its adapters stay
      trainable while disabled (`keeping_trainable`);
    - FSDP2: sharded with the policy's plan (`fully_shard` per decoder layer), in eval mode;
    - ZeRO-3: a DeepSpeed inference engine over parameters already partitioned at load (zero3_init_flag);
    - otherwise: a replica on this process's device, run under the policy's autocast.
    """
    engine = engine_name(accelerator)
    if reference is policy and engine == "fsdp2":
        return reference, keeping_trainable(policy, context_factory)
    if reference is None or reference is policy:
        return reference, context_factory
    if engine == "fsdp2":
        from accelerate.utils import fsdp2_prepare_model

        reference = fsdp2_prepare_model(accelerator, reference)
    elif engine == "fsdp1":
        raise UserError("FSDP version 1 is not supported: use recipes/accelerate/fsdp2.yaml (fsdp_version: 2).")
    elif engine == "zero3":
        import copy

        import deepspeed

        config = copy.deepcopy(accelerator.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        reference, *_ = deepspeed.initialize(model=reference, config=config)
    else:
        # DeepSpeed runs the policy in its 16-bit dtype (and no autocast): the replica matches it.
        reference = reference.to(accelerator.device, dtype=_deepspeed_dtype(accelerator) or reference.dtype)
        autocast = accelerator.autocast
        inner = context_factory

        @contextlib.contextmanager
        def context_factory():
            with autocast(), inner():
                yield

    reference.eval()
    return reference, context_factory


def keeping_trainable(model, context_factory):
    """`context_factory`, with the parameters of `model` that train on entering it left trainable inside it.

    PEFT's `disable_adapter` also sets requires_grad=False on the adapters. FSDP2 reads which parameters train
    once, at its first forward: each unit casts its reduced gradients back to the dtype of its trainable
    parameters (the fp32 master weights), or to nothing when it has none. When that first forward is the
    adapter-disabled reference's (reference.precompute computes the reference log-probs before any training
    step), no unit has trainable parameters, and the first backward assigns the bf16 reduced gradients to the
    fp32 adapters: "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float"
    (issue 19). Inside the context the adapters are bypassed, so they still receive no gradient."""

    @contextlib.contextmanager
    def context():
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        with context_factory():
            for parameter in trainable:
                parameter.requires_grad_(True)
            yield

    return context


def _deepspeed_dtype(accelerator) -> torch.dtype | None:
    config = getattr(accelerator, "deepspeed_config", None) or {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (config.get(key) or {}).get("enabled") is True:
            return dtype
    return None


def mark_sharded_for_generation(accelerator, model) -> None:
    """transformers' `generate` keeps processes in step (`synced_gpus`) for FSDP only when the model says
    it is FSDP-managed; Accelerate's FSDP2 does not say so. Without it, ranks whose greedy answers end at
    different lengths would wait for each other's all-gathers forever."""
    if engine_name(accelerator) != "fsdp2":
        return
    from .models import unwrap

    for module in unwrap(model).modules():
        if hasattr(module, "generate"):
            module._is_fsdp_managed_module = True


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict:
    """A PEFT LoRA model's full state dict -> the merged base model's state dict (W + scaling * B @ A),
    keys as the plain Hugging Face model names them. For models whose parameters are shards, where
    `merge_and_unload` cannot run on one process."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            stem = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            down, up = state_dict.get(f"{stem}.lora_A.{adapter}.weight"), state_dict.get(f"{stem}.lora_B.{adapter}.weight")
            if key.endswith(".weight") and down is not None and up is not None:
                delta = (up.float() @ down.float()) * scaling
                value = (value.float() + delta.reshape(value.shape)).to(value.dtype)
        merged[name] = value
    return merged


def global_token_mean(token_values: torch.Tensor, mask: torch.Tensor, accelerator) -> torch.Tensor:
    """`sum(values * mask) / (masked tokens of the whole global batch)`, scaled so that the gradient
    averaging of DDP/FSDP/ZeRO (a mean over processes) yields exactly the global token mean: each
    process's share is `world * local_sum / global_count`. On one process it is the plain token mean."""
    local_sum = (token_values * mask).sum()
    count = mask.sum().detach().float()
    if accelerator.num_processes == 1:
        return local_sum / count.clamp(min=1.0)
    global_count = accelerator.reduce(count.clone(), "sum")
    return local_sum * accelerator.num_processes / global_count.clamp(min=1.0)


# ---- `align train --accelerate-config NAME|PATH --num-processes N` --------------------------------------

def shipped_accelerate_configs() -> dict[str, Path]:
    from importlib import resources

    folder = resources.files("align_cli.recipes.accelerate")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_accelerate_config(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_accelerate_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise UserError(f"--accelerate-config '{name_or_path}' is neither a file nor a shipped launch config "
                    f"({', '.join(sorted(shipped))}; they live in recipes/accelerate/).")


def launch_command(config: str, num_processes: int | None, argv: list[str]) -> list[str]:
    """`accelerate launch` running this same `align` command (argv: the arguments after the program).
    `--quiet`: a worker's failure is reported by the worker (and its exit code by `relaunch`), not by a
    traceback of the launcher's own."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
               str(resolve_accelerate_config(config))]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "align_cli.cli", *argv]


# Where each relaunched worker writes its exit code: launchers turn a worker's failure into their own exit
# code 1 (torch's elastic agent, accelerate's single-process launcher), or die before it (SIGTERM).
EXIT_CODE_DIR_VARIABLE = "ALIGN_EXIT_CODE_DIR"


# The `--accelerate-config`/`--num-processes` options of the relaunched command, for the resume command a worker
# prints when interrupted (the workers' own command line has lost them).
LAUNCH_OPTIONS_VARIABLE = "ALIGN_LAUNCH_OPTIONS"


def launch_options_to_resume() -> list[str]:
    import os

    return shlex.split(os.environ.get(LAUNCH_OPTIONS_VARIABLE, ""))


def report_exit_code(code: int) -> None:
    """In a worker started by `relaunch`: leave this process's exit code for the relaunching process."""
    import os

    directory = os.environ.get(EXIT_CODE_DIR_VARIABLE)
    if not directory:
        return
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    with contextlib.suppress(OSError):
        (Path(directory) / f"rank-{rank}").write_text(str(code))


def read_exit_codes(directory: Path) -> dict[int, int]:
    """{rank: exit code} of the workers that reported one."""
    codes = {}
    for path in directory.glob("rank-*"):
        with contextlib.suppress(ValueError, OSError):
            codes[int(path.name.removeprefix("rank-"))] = int(path.read_text())
    return codes


def relaunch_exit_code(launcher_code: int, worker_codes: dict[int, int], signal_number: int | None) -> int:
    """The code `align train --accelerate-config` exits with: a failed worker's own code (rank 0's first: 2 for a
    user's mistake, 1 for a crash, 130/143 when it was signalled itself); else 128 + the signal this process
    received (the workers stopped on the SIGTERM it forwarded: 143 from them is what was asked); else the
    launcher's (a launcher killed by signal N: 128 + N, as a shell reports it)."""
    import signal

    asked = {0, 128 + signal.SIGTERM} if signal_number is not None else {0}
    failed = [worker_codes[rank] for rank in sorted(worker_codes) if worker_codes[rank] not in asked]
    if failed:
        return failed[0]
    if signal_number is not None:
        return 128 + signal_number
    return 128 - launcher_code if launcher_code < 0 else launcher_code


def _become_child_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process (not to init), so that it can wait for
    workers whose launcher died before them. False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # 36: PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _wait_for_every_child() -> None:
    import os

    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def relaunch(config: str, num_processes: int | None, argv: list[str]) -> int:
    """Run this `align` command under `accelerate launch`; return the exit code the user should see
    (`relaunch_exit_code`).

    The launcher runs in a session of its own, and SIGINT/SIGTERM sent to this process reach its process group
    as SIGTERM: a terminal's Ctrl-C or a scheduler's SIGTERM reaches the workers once, through here, and as the
    signal every launcher handles quietly (a SIGINT would end accelerate's launcher with a KeyboardInterrupt
    traceback). Torch's elastic launcher passes it on to its workers and waits for them; accelerate's
    single-process launcher dies at once, so this process also waits (as their subreaper) for orphaned workers
    to save a checkpoint and exit. The exit code is 128 + the signal received (130 for Ctrl-C)."""
    import os
    import signal
    import subprocess
    import tempfile

    if os.environ.get("LOCAL_RANK") is not None:
        raise UserError("--accelerate-config: this process was already started by a launcher; drop the option "
                        "(or run `align train` without `accelerate launch` around it).")
    command = launch_command(config, num_processes, argv)
    print("Launching: " + shlex.join(command), file=sys.stderr, flush=True)
    received: list[int] = []
    with tempfile.TemporaryDirectory(prefix="align-exit-codes-") as codes:
        subreaper = _become_child_subreaper()
        options = ["--accelerate-config", config, *(["--num-processes", str(num_processes)] if num_processes else [])]
        process = subprocess.Popen(command, start_new_session=True, env={
            **os.environ, EXIT_CODE_DIR_VARIABLE: codes, LAUNCH_OPTIONS_VARIABLE: shlex.join(options)})

        def forward(number, _frame):
            received.append(number)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

        previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            launcher_code = process.wait()
            if subreaper:
                _wait_for_every_child()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        worker_codes = read_exit_codes(Path(codes))
    return relaunch_exit_code(launcher_code, worker_codes, received[0] if received else None)
