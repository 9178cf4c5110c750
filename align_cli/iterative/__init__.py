"""Iterative methods: loops of (generate -> rank -> pairs -> train) or of curriculum stages around the
offline pairwise trainer. `METHODS[name](recipe, recipe_path, output_dir, resume, overwrite)` runs one and
returns its summary, like `trainer.train`."""

from __future__ import annotations


def run_apo(*args, **kwargs):
    from .apo import run_apo as run

    return run(*args, **kwargs)


def run_curry(*args, **kwargs):
    from .curry import run_curry as run

    return run(*args, **kwargs)


METHODS = {"apo": run_apo, "curry_dpo": run_curry}
