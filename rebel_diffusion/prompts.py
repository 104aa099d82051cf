"""Prompt sources: a text file (one prompt per line), a JSONL file (a `prompt` field per line; other fields such as
`reference` are allowed and ignored here), or a `datasets` dataset named `hub-id:split:column`."""

from __future__ import annotations

import json
from pathlib import Path


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the message is one line naming the config key."""


def read_prompt_source(source: str | Path, key: str = "prompt_file") -> list[str]:
    """The non-empty prompts of `source`; `key` names the config key in errors."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return _non_empty(_read_jsonl(path, key) if path.suffix == ".jsonl" else path.read_text().splitlines(), key, text)
    if text.count(":") == 2 and not path.exists():
        return _non_empty(_read_dataset(text, key), key, text)
    raise PromptSourceError(f"{key} {text!r} does not exist (a .txt or .jsonl file, or a dataset 'hub-id:split:column')")


def _non_empty(prompts: list[str], key: str, source: str) -> list[str]:
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise PromptSourceError(f"{key} {source!r} holds no prompts")
    return prompts


def _read_jsonl(path: Path, key: str) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSourceError(f"{key} {str(path)!r} line {number} is not JSON: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptSourceError(f"{key} {str(path)!r} line {number} has no string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def _read_dataset(spec: str, key: str) -> list[str]:
    """`hub-id:split:column` through `datasets.load_dataset` (a Hub id, or a local folder or data file)."""
    name, split, column = spec.split(":")
    try:
        import datasets
    except ImportError:
        raise PromptSourceError(f"{key} {spec!r} names a dataset, which needs `pip install datasets`") from None
    local = Path(name).expanduser()
    try:
        if local.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix, "text")
            dataset = datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        else:
            dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for a missing id, split or file; all mean "cannot read it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptSourceError(f"{key} {spec!r}: cannot load the dataset: {first}") from None
    if column not in dataset.column_names:
        raise PromptSourceError(f"{key} {spec!r}: no column {column!r}; the dataset has {dataset.column_names}")
    return [str(p) for p in dataset[column] if p is not None]
