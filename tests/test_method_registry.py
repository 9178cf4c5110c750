"""The method registry (align_cli/methods.py): every entry runs and checks through its named functions, and the
recipe schema, the CLI and the loops read the methods' facts from it instead of lists of names."""

import inspect

import pytest

from align_cli.config import MethodConfig
from align_cli.errors import UserError
from align_cli.methods import METHODS, Method
from align_cli.recipe import load_recipe


def test_every_method_names_a_runner_with_the_trainer_signature():
    assert MethodConfig.model_fields["name"].annotation.__args__ == tuple(METHODS)
    for name, method in METHODS.items():
        module, _, function = method.runner.partition(":")
        runner = getattr(__import__(module, fromlist=[function]), function)
        parameters = list(inspect.signature(runner).parameters)
        assert parameters[:5] == ["recipe", "recipe_path", "output_dir", "resume", "overwrite"], name
        assert "allow_recipe_change" in parameters, name


@pytest.mark.parametrize("name", list(METHODS))
def test_default_loss_and_online_rl_facts_drive_the_schema(name):
    """Without `losses`, a `default_loss` method trains its own loss, any other the schema's default `dpo`;
    only an `online_rl` method takes an RL loss."""
    method = MethodConfig(name=name)
    assert [term.name for term in method.losses] == [name if METHODS[name].default_loss else "dpo"]
    if not METHODS[name].online_rl:
        with pytest.raises(ValueError, match="online RL losses"):
            MethodConfig(name=name, losses=[{"name": "grpo"}])
    else:
        with pytest.raises(ValueError, match="exactly one loss term"):
            MethodConfig(name=name, losses=[{"name": "dpo"}])


def test_recipe_check_of_a_method_runs_on_load(tmp_path):
    """APO's check (its `recipe_check`) refuses a loss whose normalised anchor cannot be estimated (GRPO's refuses the
    pairwise trainer's memory keys: tests/test_memory_levers.py)."""
    assert {name for name, method in METHODS.items() if method.recipe_check} == {"apo", "grpo"}
    with pytest.raises(UserError, match="normalised"):
        load_recipe("apo", ["method.losses=[{name: ipo}]"])


def test_a_method_without_a_check_accepts_any_recipe():
    Method(runner="align_cli.pairwise.trainer:train").check(object())  # no recipe_check: nothing to look at
