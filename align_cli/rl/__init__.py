"""Online RL: GRPO / DAPO / GSPO with D^3S down-sampling and HAPO token weighting (docs/ALGORITHMS.md 7-9).

`trainer.train_rl` runs a recipe with `method.name: grpo`; `rollout` samples and scores completions,
`rewards` turns them into rewards, `advantages` into advantages and selections, `update` into optimiser
steps, and `temperature` holds HAPO's adaptive-temperature logits processor. The losses themselves are
pure functions in `align_cli.losses` (`rl`, `d3s`, `hapo`).
"""
