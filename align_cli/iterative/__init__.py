"""Iterative methods: loops of (generate -> rank -> pairs -> train) or of curriculum stages around the
offline pairwise trainer. `apo.run_apo` and `curry.run_curry` run one (their entries in align_cli/methods.py)
and return its summary, like `pairwise.trainer.train`."""
