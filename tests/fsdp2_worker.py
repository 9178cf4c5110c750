"""One process of tests/test_distributed_fsdp2.py's FSDP2 run on CPU (started by `accelerate launch`; not a test
module).

`python fsdp2_worker.py RECIPE OUTPUT_DIR [k=v ...]` trains the recipe with the pairwise trainer under FSDP2.
Accelerate builds an FSDP engine only on accelerators: on CPU it falls back to DDP or to one plain process,
whatever the launch config says. This worker gives the Accelerator the state Accelerate gives it on GPUs
(distributed type FSDP, the FSDP plugin read from the variables `accelerate launch` exported for the launch
config, its MixedPrecisionPolicy set from the recipe's precision) over a gloo process group. Everything after
that is the trainer's own path: `accelerator.prepare` shards the model with Accelerate's FSDP2 plan, the
reference is prepared by `distributed.prepare_reference`, checkpoints are written by torch.distributed.checkpoint.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import align_cli.run_setup as run_setup  # noqa: E402
from align_cli.pairwise.trainer import train  # noqa: E402
from align_cli.recipe import load_recipe  # noqa: E402

make_accelerator = run_setup.make_accelerator


def fsdp2_accelerator(recipe):
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not torch.distributed.is_initialized():  # one CPU process: Accelerate starts no process group
        torch.distributed.init_process_group("gloo")
    accelerator = make_accelerator(recipe)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerator() reads them
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)  # what AcceleratorState does on GPUs
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # every later AcceleratorState() copies it back
    assert accelerator.is_fsdp2
    return accelerator


def main() -> None:
    recipe_path, output_dir, *overrides = sys.argv[1:]
    run_setup.make_accelerator = fsdp2_accelerator
    recipe, path = load_recipe(recipe_path, overrides)
    train(recipe, path, output_dir=output_dir)


if __name__ == "__main__":
    main()
