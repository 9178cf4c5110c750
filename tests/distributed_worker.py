"""One process of tests/test_distributed.py's 2-process gloo run (started by torchrun; not a test module).

`python distributed_worker.py RECIPE OUTPUT_DIR [--set k=v ...]`: trains the recipe with the pairwise
trainer, recording the rows of every micro-batch this process collated, then checks on the same process
group that FSDP2 (`fully_shard`, as Accelerate applies it) gives the same log-probs and gradients as the
unsharded model. Writes OUTPUT_DIR/seen-RANK.json.
"""

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import align_cli.pairwise.trainer as trainer  # noqa: E402
from align_cli.recipe import load_recipe  # noqa: E402

# Plain SGD: the update is linear in the gradient, so equal weights mean equal gradients.
torch.optim.AdamW = lambda params, lr, **_: torch.optim.SGD(params, lr=lr)

seen: list[list[int]] = []
collate = trainer.collate_groups


def recording_collate(examples, *args, **kwargs):
    seen.append([example["row_index"] for example in examples])
    return collate(examples, *args, **kwargs)


def fsdp2_logprobs_match(model_dir: str) -> bool:
    """sequence_logps through a model sharded like Accelerate's FSDP2 plan (decoder layers, then the tied
    embedding + final norm + head as one group, then the root) equals the unsharded model, gradients too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from align_cli.data.batching import pad_sequences
    from align_cli.logprobs import sequence_logps

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sharded = copy.deepcopy(full)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard([sharded.model.norm, sharded.model.embed_tokens, sharded.lm_head], mesh=mesh,
                reshard_after_forward=False)
    fully_shard(sharded, mesh=mesh)
    batch = pad_sequences([[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13]], 0)
    for fused in (True, False):
        sums = []
        for model in (full, sharded):
            model.zero_grad()
            sums.append(sequence_logps(model, batch, fused=fused).sums)
            sums[-1].sum().backward()
        torch.testing.assert_close(sums[1], sums[0])
        for (name, shard), (_, whole) in zip(sharded.named_parameters(), full.named_parameters()):
            torch.testing.assert_close(shard.grad.full_tensor(), whole.grad, rtol=1e-4, atol=1e-6, msg=name)
    return True


def main() -> None:
    recipe_path, output_dir, *overrides = sys.argv[1:]
    overrides = [item for item in overrides if item != "--set"]
    trainer.collate_groups = recording_collate
    recipe, path = load_recipe(recipe_path, overrides)
    summary = trainer.train(recipe, path, output_dir=output_dir)
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    result = {"rows": seen, "world_size": torch.distributed.get_world_size() if distributed else 1,
              "reference": summary.get("reference")}
    if distributed:
        result["fsdp2_logprobs_match"] = fsdp2_logprobs_match(recipe.model.name)
    Path(output_dir, f"seen-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
