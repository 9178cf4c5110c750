"""Loading a dataset source named in a recipe: builtin, local file or directory, or hub name."""

from __future__ import annotations

import codecs
import json
import os
from importlib import resources
from pathlib import Path

from ..errors import UserError

BUILTIN_PREFIX = "builtin:"
_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def builtin_datasets() -> dict[str, list[str]]:
    """Shipped data sets by name, with their splits (files are `NAME.SPLIT.jsonl`)."""
    found: dict[str, list[str]] = {}
    for entry in resources.files("align_cli.builtin_data").iterdir():
        parts = entry.name.split(".")
        if len(parts) == 3 and parts[2] == "jsonl":
            found.setdefault(parts[0], []).append(parts[1])
    return found


def _builtin_file(name: str, split: str) -> str:
    available = builtin_datasets()
    if name not in available:
        raise UserError(f"Unknown builtin dataset 'builtin:{name}'. Builtin datasets: "
                        + ", ".join(f"builtin:{n}" for n in sorted(available)) + ".")
    if split not in available[name]:
        raise UserError(f"builtin:{name} has no split '{split}'; its splits are {', '.join(sorted(available[name]))}.")
    return str(resources.files("align_cli.builtin_data") / f"{name}.{split}.jsonl")


def load_source(source: str, split: str = "train", subset: str | None = None):
    """Return a `datasets.Dataset` for a recipe's `data.*.source`."""
    import datasets

    if source.startswith(BUILTIN_PREFIX):
        path = _builtin_file(source[len(BUILTIN_PREFIX):], split)
        return datasets.load_dataset("json", data_files={split: path}, split=split)
    path = Path(source).expanduser()
    if path.is_file():
        if not path.read_bytes()[:4096].strip():
            raise UserError(f"Data file '{source}' is empty: it has no rows to train on.")
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise UserError(f"Data file '{source}' has an unsupported extension '{path.suffix}'; "
                            f"use one of {', '.join(_FILE_LOADERS)}.")
        if loader in ("json", "csv") and not _is_utf8(path):
            # pyarrow stores invalid bytes unchecked and fails only when the row is read, far from the file.
            raise UserError(f"Data file '{source}', {first_bad_line(path, loader)}.") from None
        try:
            return datasets.load_dataset(loader, data_files={split: str(path)}, split=split)
        except Exception as error:  # datasets raises many types for malformed files
            problem = first_bad_line(path, loader)
            if problem:
                raise UserError(f"Data file '{source}', {problem}. Fix or remove that line.") from None
            raise UserError(f"Could not read data file '{source}' as {loader}: {error}") from None
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(path), subset, split=split)
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _FILE_LOADERS:
        raise UserError(f"Data file '{source}' does not exist. Check the path in data.*.source "
                        f"(relative paths are read from {os.getcwd()}).")
    return _load_hub(source, split, subset)


def _is_utf8(path: Path, chunk_bytes: int = 1 << 20) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as stream:
        try:
            while chunk := stream.read(chunk_bytes):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def first_bad_line(path: Path, loader: str) -> str | None:
    """Where a text data file stops being readable: the first line that is not UTF-8 or, for JSON lines, not
    one JSON object. `datasets` reports neither the line nor the key; None when no such line is found."""
    raw = path.read_bytes()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            key = _key_holding_undecodable_byte(line) if loader == "json" else None
            where = f", key '{key}'" if key else ""
            return (f"line {number}{where}, byte {error.start + 1}: byte 0x{line[error.start]:02x} is not UTF-8. "
                    f"Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    if loader != "json":
        return None
    text = raw.decode("utf-8")
    if text.lstrip().startswith("["):  # one JSON document (a list of rows) rather than JSON lines
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
        return None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}, column {error.colno}: not valid JSON ({error.msg})"
        if not isinstance(row, dict):
            return f"line {number}: a row must be a JSON object of columns, found a {type(row).__name__}"
    return None


def _key_holding_undecodable_byte(line: bytes) -> str | None:
    """The top-level key of a JSON line whose value holds the invalid byte (decoded as a lone surrogate)."""
    try:
        row = json.loads(line.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        return None

    def holds_surrogate(value) -> bool:
        if isinstance(value, str):
            return any("\udc80" <= character <= "\udcff" for character in value)
        if isinstance(value, dict):
            return any(holds_surrogate(v) for v in value.values())
        return isinstance(value, list) and any(holds_surrogate(v) for v in value)

    return next((key for key, value in row.items() if holds_surrogate(value)), None) if isinstance(row, dict) else None


def row_location(source: str, index: int) -> str:
    """`line N` of a local JSON-lines file for the row at 0-based `index` (blank lines hold no row), else
    `row N` counting from 1."""
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
        with path.open("rb") as lines:
            if not lines.read(4096).lstrip().startswith(b"["):
                lines.seek(0)
                rows = (number for number, line in enumerate(lines, start=1) if line.strip())
                number = next((n for position, n in enumerate(rows) if position == index), None)
                if number is not None:
                    return f"line {number}"
    return f"row {index + 1}"


def _load_hub(name: str, split: str, subset: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as error:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        reason = ("hub access is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache"
                  if offline else f"loading it failed: {error}")
        raise UserError(f"Dataset '{name}' (split '{split}') could not be loaded: {reason}. "
                        f"Use a local file, a builtin dataset ({', '.join('builtin:' + n for n in builtin_datasets())}), "
                        f"or run online once to cache it.") from None


def train_prompt_rows(recipe) -> list[dict]:
    """The rows of `data.train` (at most `max_rows`) for methods that sample their own responses: each row
    keeps every column, with its prompt (string or chat messages) under `prompt`."""
    source = recipe.data.train
    dataset = load_source(source.source, source.split, source.subset)
    column = source.columns.prompt
    if column not in dataset.column_names:
        raise UserError(f"data.train '{source.source}' has no prompt column '{column}' (columns: "
                        f"{', '.join(dataset.column_names)}). Set data.train.columns.prompt.")
    if source.max_rows:
        dataset = dataset.select(range(min(source.max_rows, len(dataset))))
    return [{**row, "prompt": row[column]} for row in dataset]
