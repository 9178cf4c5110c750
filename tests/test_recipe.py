"""Recipe schema, YAML errors with lines and suggestions, --set overrides, shipped recipes."""

import pytest

from align_cli.config import Recipe
from align_cli.errors import UserError
from align_cli.recipe import builtin_recipes, load_recipe, schema_text, set_dotted_key


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe, path = load_recipe(name)
    assert path.name == f"{name}.yaml" and isinstance(recipe, Recipe)


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "model:\n  name: x\ntraining:\n  learning_rat: 1e-5\n")
    with pytest.raises(UserError) as error:
        load_recipe(str(path))
    message = str(error.value)
    assert str(path) in message and "line 4" in message and "training.learning_rat" in message
    assert "Did you mean 'learning_rate'" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "training:\n  batch_size: lots\n")
    with pytest.raises(UserError, match=r"line 2.*training\.batch_size.*'lots'"):
        load_recipe(str(path))


def test_set_overrides_any_key_and_is_validated(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 1.0e-5\n")
    recipe, _ = load_recipe(str(path), ["training.learning_rate=1e-6", "method.losses.0.beta=0.3", "peft.enabled=true"])
    assert recipe.training.learning_rate == 1e-6
    assert recipe.method.losses[0].params == {"beta": 0.3} and recipe.peft.enabled
    with pytest.raises(UserError, match="Did you mean 'max_steps'"):
        load_recipe(str(path), ["training.max_step=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_recipe(str(path), ["training.max_steps"])


def test_unknown_loss_and_hyperparameter(tmp_path):
    path = write(tmp_path, "method:\n  losses:\n    - name: dpoo\n")
    with pytest.raises(UserError, match="unknown loss 'dpoo'.*Did you mean 'dpo'"):
        load_recipe(str(path))
    path = write(tmp_path, "method:\n  losses:\n    - name: dpo\n      betta: 0.1\n")
    with pytest.raises(UserError, match="line 3.*no hyperparameter 'betta'.*Did you mean 'beta'"):
        load_recipe(str(path))


def test_missing_recipe_suggests_shipped_one():
    with pytest.raises(UserError, match="does not exist.*Did you mean the shipped recipe 'dpo'"):
        load_recipe("recipes/dop.yaml")


def test_lengths_are_consistent(tmp_path):
    with pytest.raises(UserError, match="max_prompt_length"):
        load_recipe(str(write(tmp_path, "data:\n  max_length: 64\n  max_prompt_length: 64\n")))


def test_schema_documents_every_key():
    text = schema_text()
    for section, model in Recipe.model_fields.items():
        nested = model.annotation
        for key in nested.model_fields:
            assert f"{section}.{key}" in text, f"{section}.{key} missing from the schema text"


def test_set_dotted_key_creates_sections_indexes_lists_and_names_a_value_in_the_way():
    """The one dotted-key setter (`--set`, the iterative loops' derived recipes, the tests' tiny recipes)."""
    data = {"method": {"losses": [{"name": "dpo"}, {"name": "sft"}]}, "training": {"seed": 1}}
    set_dotted_key(data, ["method", "losses", "1", "weight"], 0.5, "--set method.losses.1.weight=0.5")
    set_dotted_key(data, ["logging", "progress"], False, "--set logging.progress=false")
    set_dotted_key(data, ["method", "losses", "0"], {"name": "ipo"}, "--set method.losses.0={name: ipo}")
    assert data == {"method": {"losses": [{"name": "ipo"}, {"name": "sft", "weight": 0.5}]},
                    "training": {"seed": 1}, "logging": {"progress": False}}
    with pytest.raises(UserError, match=r"--set training.seed.x=2: 'seed' is a value, not a section"):
        set_dotted_key(data, ["training", "seed", "x"], 2, "--set training.seed.x=2")
