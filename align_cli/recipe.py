"""Recipe loading: YAML file -> `--set` overrides -> validated `Recipe`, with errors a user can act on.

Every error names the file, the line where YAML has one, the key, and what to write instead
(the closest valid key for a misspelling).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import LossTerm, Recipe
from .errors import UserError
from .methods import METHODS

LOSSES_HINT = "see `align recipes show --schema` for every key"


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package, by name (file stem)."""
    folder = resources.files("align_cli.recipes")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = builtin_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(path.stem, shipped, n=1)
    hint = f" Did you mean the shipped recipe '{close[0]}'?" if close else ""
    raise UserError(f"Recipe file '{name_or_path}' does not exist.{hint} "
                    f"Shipped recipes: {', '.join(sorted(shipped))} (`align recipes` lists them).")


def _compose(text: str, source: str) -> tuple[dict, yaml.Node | None]:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{source}: not valid YAML: {error}") from None
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a mapping of sections (model:, data:, training:, ...), "
                        f"found {type(data).__name__}.")
    return data, node


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """The 1-based line of the YAML node at `location` (or of its deepest existing parent)."""
    line = None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            match = next((value for k, value in node.value if k.value == key), None)
            key_node = next((k for k, _ in node.value if k.value == key), None)
            if match is None:
                break
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-6` -> (['training', 'learning_rate'], 1e-6); the value is read as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set '{assignment}': write overrides as KEY=VALUE, e.g. --set training.learning_rate=1e-6")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return [part for part in key.strip().split(".") if part], value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for assignment in overrides:
        path, value = parse_override(assignment)
        set_dotted_key(data, path, value, f"--set {assignment}")
    return data


def set_dotted_key(data: dict, path: list[str], value: Any, described_as: str) -> None:
    """`data[path[0]][path[1]]... = value` on a recipe's nested dicts: a missing section is created, a digit
    indexes a list (`method.losses.0.beta`). `described_as` names the assignment in the error for a path that
    runs through a value (`--set training.seed.x=1`)."""
    target = data
    for part in path[:-1]:
        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
            continue
        if not isinstance(target.get(part, {}), (dict, list)):
            raise UserError(f"{described_as}: '{part}' is a value, not a section.")
        target = target.setdefault(part, {})
    last = path[-1]
    if isinstance(target, list) and last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value


def _valid_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """The field names of the section at `location` (for 'did you mean')."""
    current: Any = model
    for key in location[:-1]:
        field = current.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


def _describe(error: dict, source: str, node: yaml.Node | None) -> str:
    location = tuple(error["loc"])
    dotted = ".".join(str(part) for part in location) or "(top level)"
    line = _line_of(node, location)
    where = f"{source}, line {line}" if line else source
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(Recipe, location)
        close = difflib.get_close_matches(str(location[-1]), valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys here: {', '.join(valid)}."
        return f"{where}: unknown key '{dotted}'.{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {dotted}: {error['msg']}{shown}."


def _check_losses(recipe: Recipe, source: str, node: yaml.Node | None, ranges: bool = True) -> None:
    """Loss names and hyperparameter names, and (with `ranges`) each value against its loss's range."""
    from .losses import LOSSES, hyperparameters

    for index, term in enumerate(recipe.method.losses):
        line = _line_of(node, ("method", "losses", index))
        where = f"{source}, line {line}" if line else source
        if term.name not in LOSSES:
            close = difflib.get_close_matches(term.name, LOSSES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{where}: method.losses[{index}].name: unknown loss '{term.name}'.{hint} "
                            f"Available: {', '.join(sorted(LOSSES))}.")
        accepted = hyperparameters(LOSSES[term.name])
        for key in term.params:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise UserError(f"{where}: method.losses[{index}]: loss '{term.name}' has no hyperparameter '{key}'.{hint} "
                                f"Its hyperparameters: {', '.join(accepted) or 'none'}.")
        if ranges:
            _check_ranges(term, index, source, node)


def _check_ranges(term, index: int, source: str, node: yaml.Node | None) -> None:
    """Every hyperparameter the term sets must lie in the range its loss declares (losses/ranges.py)."""
    from .losses import LOSSES, hyperparameter_ranges
    from .losses.ranges import out_of_range

    problems = out_of_range(hyperparameter_ranges(LOSSES[term.name]), term.params)
    if not problems:
        return
    key, value, requirement = problems[0]
    line = _line_of(node, ("method", "losses", index, key))
    where = f"{source}, line {line}" if line else source
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = f" YAML read {value!r} as text: write the number with a decimal point (e.g. 1.0e-3 for 1e-3)."
        except ValueError:
            pass
    raise UserError(f"{where}: method.losses.{index}.{key} = {value!r} is out of range: loss '{term.name}' needs "
                    f"{requirement}.{hint} Set a value in that range in the recipe or with "
                    f"--set method.losses.{index}.{key}=VALUE.")


def _validate(data: dict, source: str, node: yaml.Node | None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        messages = [_describe(e, source, node) for e in error.errors()]
        raise UserError(" ".join(messages[:3]) + (f" (and {len(messages) - 3} more)" if len(messages) > 3 else "")
                        + f" Fix the recipe or the --set value; {LOSSES_HINT}.") from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read, validate, override and re-validate a recipe; every problem becomes one `UserError`.

    Overrides apply to the complete recipe (defaults filled in), so `--set method.losses.0.beta=0.3`
    works even where the file leaves the losses at their default."""
    path = resolve_recipe_path(name_or_path)
    source = str(path)
    data, node = _compose(path.read_text(), source)
    recipe = _validate(data, source, node)
    # A value out of range in the file may be what the --set overrides correct: check ranges after them.
    _check_losses(recipe, source, node, ranges=not overrides)
    if overrides:
        complete = apply_overrides(recipe.model_dump(mode="json"), list(overrides))
        recipe = _validate(complete, f"{source} with --set {' '.join(overrides)}", None)
        _check_losses(recipe, f"{source} with --set", None)
    _check_method(recipe, source if not overrides else f"{source} with --set")
    return recipe, path


def _check_method(recipe: Recipe, source: str) -> None:
    """What no single key shows (each method's `recipe_check`, e.g. APO with a loss that needs the normalised
    anchor samples from the policy)."""
    try:
        METHODS[recipe.method.name].check(recipe)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def schema_text() -> str:
    """Every recipe key with its type, default and description, for `align recipes show --schema`."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = next((c for c in [annotation, *getattr(annotation, "__args__", ())]
                           if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if nested is not None and nested is not LossTerm:
                lines.append(f"\n{prefix}{name}:  {field.description or ''}".rstrip())
                walk(nested, prefix + name + ".")
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = [item.model_dump() if isinstance(item, BaseModel) else item for item in default]
            type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            lines.append(f"  {prefix}{name} ({type_name}, default {default!r}): {field.description or ''}")

    walk(Recipe, "")
    return "\n".join(lines).strip() + "\n"
