"""Reference log-probs: computed live from a frozen model, or once and cached on disk.

The disk cache is keyed by a hash of (reference model identity, tokenised data fingerprint,
tokenisation settings, dtype, log-prob path), so a second run with the same key reuses the file and
never runs the reference model. A changed model file, data row or setting gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from ..data.batching import GroupedBatch, collate_groups
from ..logprobs import sequence_logps
from ..paths import cache_root


def model_identity(location: str) -> dict:
    """What identifies a model's weights: for a directory, its weight files' names, sizes and mtimes."""
    path = Path(location)
    if not path.is_dir():
        return {"hub_id": location}
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    return {"path": str(path.resolve()),
            "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def cache_key(identity: dict, data_fingerprint: str, settings: dict) -> str:
    payload = json.dumps({"model": identity, "data": data_fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class LiveReference:
    """Runs the reference model (or the adapter-disabled policy) without autograd on each batch, in the
    batch's own layout (padded or packed). `collate` lays out the batches it precomputes (`compute_rows`):
    the policy's layout, so cached and live log-probs round alike."""

    def __init__(self, model, context_factory, fused: bool, groups: list[str], collate=collate_groups,
                 host_weights=None):
        self.model, self.context_factory, self.fused, self.groups = model, context_factory, fused, groups
        self.collate = collate
        self.host_weights = host_weights  # reference.offload: a HostResidentWeights, fetched ahead by `prefetch`

    def prefetch(self) -> None:
        """Start bringing offloaded weights to the device (before the policy's forward, which the copy overlaps)."""
        if self.host_weights is not None:
            self.host_weights.fetch()

    @torch.no_grad()
    def __call__(self, batch: GroupedBatch) -> dict[str, torch.Tensor]:
        with self.context_factory():  # with reference.offload: the weights on the device (run_setup.prepare_run)
            sums = sequence_logps(self.model, batch.sequences, fused=self.fused).sums
        return {f"ref_{name}": sums[batch.groups[name]] for name in self.groups}


class CachedReference:
    """Looks reference log-probs up by row index, one tensor per sequence group."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def __call__(self, batch: GroupedBatch) -> dict[str, torch.Tensor]:
        device = batch.sequences.input_ids.device
        return {f"ref_{name}": values[batch.row_index].to(device) for name, values in self.table.items()}


@torch.no_grad()
def compute_rows(live: LiveReference, dataset, rows: list[int], pad_id: int, batch_size: int, device,
                 table: dict[str, torch.Tensor]) -> None:
    """Fill `table[group][r]` with reference log-probs for each row index `r` in `rows`."""
    for start in range(0, len(rows), batch_size):
        examples = [dataset[i] for i in rows[start: start + batch_size]]
        batch = live.collate(examples, live.groups, pad_id)
        result = live(batch.to(device))
        for name in live.groups:
            table[name][batch.row_index] = result[f"ref_{name}"].float().cpu()


@torch.no_grad()
def compute_rows_shared(live: LiveReference, dataset, rows: list[int], pad_id: int, batch_size: int, device,
                        table: dict[str, torch.Tensor]) -> None:
    """`compute_rows` split over the processes of a distributed run, then exchanged, so every process ends
    with all rows. Each process computes an equal share (its last row repeated to even the counts): under
    FSDP2 and ZeRO-3 every forward needs every process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute_rows(live, dataset, rows, pad_id, batch_size, device, table)
    world, rank = dist.get_world_size(), dist.get_rank()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share: (rank + 1) * share] or rows[-1:]
    mine = mine + mine[-1:] * (share - len(mine))
    local = {name: torch.full((len(dataset),), float("nan")) for name in live.groups}
    compute_rows(live, dataset, mine, pad_id, batch_size, device, local)
    for name in live.groups:
        values = local[name].to(device)
        known = ~torch.isnan(values)
        summed = torch.stack([torch.where(known, values, torch.zeros_like(values)), known.float()])
        dist.all_reduce(summed)
        filled = summed[1] > 0
        table[name][filled.cpu()] = (summed[0][filled] / summed[1][filled]).cpu()


def cached_or_computed(live: LiveReference, dataset, rows: list[int], pad_id: int, batch_size: int, device,
                       key: str, cache_dir: str | None, is_main: bool = True) -> tuple[CachedReference, int]:
    """Reference log-probs for `rows` of `dataset` (row index = position), from the cache file of `key`
    where present; rows missing from it are computed and the file is rewritten atomically. A run
    computes only the rows it will visit; a later run with the same key computes none of those again.
    Returns the provider and how many rows were computed now."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "reference_logps"
    path = folder / f"{key}.pt"
    table = torch.load(path, map_location="cpu")["groups"] if path.exists() else {}
    for name in live.groups:
        table.setdefault(name, torch.full((len(dataset),), float("nan")))
    missing = [row for row in rows if any(torch.isnan(table[name][row]) for name in live.groups)]
    if missing:
        if is_main:
            print(f"Reference log-probs: computing {len(missing)} of {len(rows)} rows once "
                  f"(cached in {path} for later runs).", flush=True)
        compute_rows_shared(live, dataset, missing, pad_id, batch_size, device, table)
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"groups": table, "key": key}, staging)
            os.replace(staging, path)
    return CachedReference({name: table[name] for name in live.groups}), len(missing)
