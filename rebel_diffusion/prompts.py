"""Prompt sources: a text file (one prompt per line), a JSONL file (a `prompt` field per line; other fields such as
`reference` are allowed and ignored here), or a `datasets` dataset named `hub-id:split:column`.

Offline responses (REBEL's `rebel.mu = "offline"`): a JSONL file with `prompt` and `response` fields, or a dataset
named `hub-id:split:prompt_column:response_column`, whose responses may be strings or chat conversations (lists of
`{"role", "content"}` messages, as the chosen answers of a preference set): the last assistant message is the response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


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


def _jsonl_records(path: Path, key: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; one line naming `key` for one that is not
    JSON."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSourceError(f"{key} {source!r} line {number} is not JSON: {e.msg}") from None


def _read_jsonl(path: Path, key: str) -> list[str]:
    prompts = []
    for number, record in _jsonl_records(path, key, str(path)):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptSourceError(f"{key} {str(path)!r} line {number} has no string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def _load_dataset(name: str, split: str, key: str, spec: str, columns: list[str]) -> Any:
    """`datasets.load_dataset` of a Hub id, a local folder or a data file, checked to hold `columns`."""
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
    for column in columns:
        if column not in dataset.column_names:
            raise PromptSourceError(f"{key} {spec!r}: no column {column!r}; the dataset has {dataset.column_names}")
    return dataset


def _read_dataset(spec: str, key: str) -> list[str]:
    """`hub-id:split:column` through `datasets.load_dataset` (a Hub id, or a local folder or data file)."""
    name, split, column = spec.split(":")
    return [str(p) for p in _load_dataset(name, split, key, spec, [column])[column] if p is not None]


def _response_text(value: Any) -> str | None:
    """A response field as text: a string, or a chat conversation's last assistant message; None otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        answers = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        if answers and isinstance(answers[-1], str):
            return answers[-1]
    return None


def read_offline_responses(source: str | Path, key: str) -> dict[str, list[str]]:
    """Each prompt's offline responses from `source` (see the module docstring); `key` names the config key in errors,
    one line each (`PromptSourceError`) for a missing source, a record without a prompt or response, or no records."""
    text = str(source)
    path = Path(text).expanduser()
    pairs: list[tuple[Any, Any]] = []
    if path.is_file():
        for number, record in _jsonl_records(path, key, text):
            if not isinstance(record, dict) or "prompt" not in record or "response" not in record:
                raise PromptSourceError(f"{key} {text!r} line {number} needs the fields 'prompt' and 'response'")
            pairs.append((record["prompt"], record["response"]))
    elif text.count(":") == 3 and not path.exists():
        name, split, prompt_column, response_column = text.split(":")
        dataset = _load_dataset(name, split, key, text, [prompt_column, response_column])
        pairs = list(zip(dataset[prompt_column], dataset[response_column]))
    else:
        raise PromptSourceError(f"{key} {text!r} does not exist (a .jsonl file with 'prompt' and 'response' fields, "
                                f"or a dataset 'hub-id:split:prompt_column:response_column')")
    responses: dict[str, list[str]] = {}
    for number, (prompt, response) in enumerate(pairs, start=1):
        answer = _response_text(response)
        if not isinstance(prompt, str) or answer is None:
            raise PromptSourceError(f"{key} {text!r} record {number}: the prompt must be a string and the response a "
                                    f"string or a chat conversation ending in an assistant message")
        if prompt.strip():
            responses.setdefault(prompt.strip(), []).append(answer)
    if not responses:
        raise PromptSourceError(f"{key} {text!r} holds no responses")
    return responses
