"""Load task files (science, tooluse) into `TaskExample`s, and write JSONL atomically.

Accepted inputs, detected from the path:

- ``.jsonl``: one JSON object per line (blank lines skipped);
- ``.json``: a JSON list of row objects;
- ``.parquet``: one row per record;
- a Hugging Face ``datasets.save_to_disk`` directory (it holds ``dataset_info.json`` or
  ``state.json``), e.g. the SDFT reference eval sets under
  ``shared/data/sdft_reference_eval/{science,tooluse}_data/eval_data``.

Row fields (``TASK_FIELDS`` lists the required ones):

- science: ``prompt`` (a chat-message list, its Python repr or JSON string, or a plain
  question string -> one user message) and ``answer`` (one letter A-Z).
- tooluse: ``prompt`` (the full ReAct prompt string -> one user message) and
  ``golden_answer`` (a list of ``{"Action": ..., "Action_Input": "<json string>"}`` or its
  Python repr / JSON string; a dict ``Action_Input`` is ``json.dumps``-ed). ``name``,
  ``description``, ``nl_documentation`` and ``instruction`` go to ``meta`` when present.
- both: optional ``id``/``uid`` (else ``f"{task}-{index}"``, index 0-based) and optional
  ``golden_response`` (a list of strings joined by newlines, or one string) as the
  demonstration; without it the demonstration is ``golden_response(task, answer)``;
  optional ``unit``, the independent unit a row belongs to (rows about one fact or compound
  share it; the report's bootstrap resamples units, not rows), in ``meta["unit"]``.

Repr strings are parsed with ``ast.literal_eval``, never ``eval``. Every problem raises one
`DataError` naming the file, the line (JSONL) or row (other formats), the field, and the fix.

Example:

    >>> exs = load_task_file("shared/data/sdft_reference_eval/science_data/eval_data",
    ...                      "science", limit=2)  # doctest: +SKIP
    >>> exs[0].answer, exs[0].demonstration  # doctest: +SKIP
    ('A', '<answer>\\nA\\n</answer>')
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sdftlab.data.records import (
    GOLDEN_INPUT_FIX,
    TASK_NAMES,
    TaskExample,
    ToolCall,
    golden_response,
    parse_json_object,
)
from sdftlab.errors import ConfigError, DataError
from sdftlab.paths import atomic_write

TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "science": ("prompt", "answer"),
    "tooluse": ("prompt", "golden_answer"),
}
TOOLUSE_META_FIELDS: tuple[str, ...] = ("name", "description", "nl_documentation", "instruction")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
_DATASET_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json")
_ANSWER_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# --------------------------------------------------------------------------- reading rows


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file."""
    p = Path(path)
    _require_exists(p)
    try:
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                yield lineno, _parse_jsonl_line(p, lineno, line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc}); save the file as UTF-8 JSONL") from exc


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    return parse_json_object(
        line, f"{path} line {lineno}:", invalid="malformed JSON",
        not_object="expected a JSON object",
        fix='each line must be one complete JSON object such as {"prompt": ..., ...}',
    )  # fmt: skip


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path (cwd is {Path.cwd()})")


def _read_json_list(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc}); expected a JSON list of rows") from exc
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of row objects, got {type(data).__name__}; "
            "write [{...}, {...}] or use .jsonl"
        )
    return _located_rows(path, data)


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: unreadable parquet file ({exc}); rewrite it") from exc
    return _located_rows(path, rows)


def _read_saved_dataset(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for damaged folders
        raise DataError(f"{path}: unreadable save_to_disk directory ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise DataError(
            f"{path}: a DatasetDict with splits [{splits}]; pass one split folder, "
            f"e.g. {path / next(iter(ds), 'train')}"
        )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _located_rows(path, ds.to_list())


def _located_rows(path: Path, rows: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    located = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        located.append((where, row))
    return located


def _read_rows(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """(location for messages, raw row) pairs; at most ``limit`` when it is given."""
    _require_exists(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or any(
            (path / m).exists() for m in _DATASET_MARKERS
        ):
            return _read_saved_dataset(path, limit)
        raise DataError(
            f"{path}: a directory without {' or '.join(_DATASET_MARKERS)}; pass a "
            f"{'/'.join(SUPPORTED_SUFFIXES)} file or a datasets save_to_disk directory"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: list[tuple[str, dict[str, Any]]] = []
        for lineno, row in iter_jsonl(path):
            rows.append((f"{path} line {lineno}", row))
            if limit is not None and len(rows) >= limit:
                break  # lines after the limit are not even parsed
        return rows
    if suffix == ".json":
        return _read_json_list(path)[:limit]
    if suffix == ".parquet":
        return _read_parquet(path)[:limit]
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; use one of "
        f"{', '.join(SUPPORTED_SUFFIXES)} or a datasets save_to_disk directory"
    )


# --------------------------------------------------------------------------- fields


def _require_fields(where: str, task: str, row: dict[str, Any]) -> None:
    for name in TASK_FIELDS[task]:
        if row.get(name) is None:
            need = " and ".join(repr(f) for f in TASK_FIELDS[task])
            raise DataError(f"{where}: missing field {name!r} ({task} rows need {need})")


def _literal(text: str) -> Any:
    """Parse a Python repr or a JSON string; raise ValueError if it is neither."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"neither a Python literal nor JSON ({exc.msg})") from exc


def _parse_messages(where: str, value: Any) -> list[dict[str, str]]:
    """Chat messages from a list of dicts, its repr/JSON string, or a plain string."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                parsed = _literal(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                return _parse_messages(where, parsed)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: field 'prompt' must be a string or a non-empty list of "
            f"{{'role', 'content'}} messages, got {type(value).__name__}"
        )
    _check_items(
        where,
        "prompt",
        "message",
        value,
        "string 'role' and 'content'",
        lambda m: isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
    )
    messages = [{"role": m["role"], "content": m["content"]} for m in value]  # fmt: skip
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: field 'prompt' has no 'user' message; add the question")
    return messages


def _parse_letter(where: str, value: Any) -> str:
    letter = value.strip() if isinstance(value, str) else value
    if not (isinstance(letter, str) and letter in _ANSWER_LETTERS):
        raise DataError(
            f"{where}: field 'answer' must be a single capital letter A-Z (the option), "
            f"got {value!r:.40}"
        )
    return letter


def _action_input(where: str, i: int, value: Any) -> str:
    """The Action_Input as a JSON string, validated; '' (no input) is kept as is."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field 'golden_answer' call {i}: 'Action_Input' must be a JSON "
            f"string or an object, got {type(value).__name__}"
        )
    if value.strip():
        parse_json_object(value, f"{where}: field 'golden_answer' call {i}: 'Action_Input'",
                          fix=GOLDEN_INPUT_FIX)  # fmt: skip
    return value


def _parse_golden(where: str, value: Any) -> tuple[ToolCall, ...]:
    """The golden tool calls from a list of dicts or its Python repr / JSON string."""
    if isinstance(value, str):
        try:
            value = _literal(value)
        except ValueError as exc:
            raise DataError(
                f"{where}: field 'golden_answer' does not parse ({exc}); expected a list "
                "like [{'Action': 'name', 'Action_Input': '{...}'}]"
            ) from exc
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"{where}: field 'golden_answer' must be a non-empty list of "
            f"{{'Action', 'Action_Input'}} dicts, got {value!r:.60}"
        )
    _check_items(
        where,
        "golden_answer",
        "call",
        value,
        "'Action' (string) and 'Action_Input'",
        lambda c: isinstance(c.get("Action"), str) and "Action_Input" in c,
    )
    return tuple(ToolCall(c["Action"], _action_input(where, i, c["Action_Input"]))
                 for i, c in enumerate(value))  # fmt: skip


def _check_items(
    where: str, field: str, noun: str, items: Any, wanted: str, ok: Callable[[dict], bool]
) -> None:
    """Every item of a list field is a dict `ok` accepts; else one error naming the first."""
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and ok(item)):
            raise DataError(f"{where}: field '{field}' {noun} {i} must be a dict with {wanted}, "
                            f"got {item!r:.80}")  # fmt: skip


def _demonstration(where: str, row: dict[str, Any], task: str, answer: Any) -> str:
    value = row.get("golden_response")
    if value is None:
        return golden_response(task, answer)
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return "\n".join(value)
    raise DataError(
        f"{where}: field 'golden_response' must be a list of strings (joined by newlines) "
        f"or a string, got {type(value).__name__}"
    )


def _uid(row: dict[str, Any], task: str, index: int) -> str:
    for key in ("id", "uid"):
        if row.get(key) is not None:
            return str(row[key])
    return f"{task}-{index}"


def row_to_example(where: str, task: str, index: int, row: dict[str, Any]) -> TaskExample:
    """Convert one raw row (already read from a file) into a `TaskExample`."""
    _require_fields(where, task, row)
    messages = _parse_messages(where, row["prompt"])
    meta: dict[str, Any] = {}
    answer: str | tuple[ToolCall, ...]
    if task == "science":
        answer = _parse_letter(where, row["answer"])
    else:
        answer = _parse_golden(where, row["golden_answer"])
        meta = {k: row[k] for k in TOOLUSE_META_FIELDS if k in row}
    if row.get("unit") is not None:  # rows about one fact share it: resampled together
        meta["unit"] = str(row["unit"])
    return TaskExample(
        task=task,
        uid=_uid(row, task, index),
        messages=messages,
        answer=answer,
        demonstration=_demonstration(where, row, task, answer),
        meta=meta,
    )


# --------------------------------------------------------------------------- public API


def check_task(task: str) -> None:
    """Raise DataError unless ``task`` is a known task name."""
    if task not in TASK_FIELDS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")


def load_task_file(
    path: str | os.PathLike[str], task: str, *, limit: int | None = None
) -> list[TaskExample]:
    """Load a task file (.jsonl/.json/.parquet or save_to_disk dir) as `TaskExample`s.

    ``limit`` keeps the first ``limit`` rows (only those are validated).
    """
    check_task(task)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    p = Path(path)
    rows = _read_rows(p, limit)
    if not rows:
        raise DataError(f"{p}: no rows; the file is empty (expected {task} rows)")
    return [row_to_example(where, task, i, row) for i, (where, row) in enumerate(rows)]


def count_rows(path: str | os.PathLike[str], *, limit: int | None = None) -> int:
    """How many rows of a task file (any format `load_task_file` reads) `limit` leaves."""
    return len(_read_rows(Path(path), limit))


def write_task_file(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSONL atomically (`paths.atomic_write`)."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl":
        raise DataError(f"{p}: write_task_file writes JSONL; give the path a .jsonl suffix")
    with atomic_write(p, encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            fh.write(_dump_row(p, i, row) + "\n")


def _dump_row(path: Path, index: int, row: Any) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{path} row {index + 1}: expected a dict, got {type(row).__name__}")
    try:
        return json.dumps(row, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{path} row {index + 1}: not JSON-serialisable ({exc}); convert the values "
            "to str/int/float/bool/list/dict"
        ) from exc


def world_task_file(data_dir: Path, task: str, split: str) -> Path:
    """Where the tiny world keeps a task's split: `<data_dir>/<task>_<split>.jsonl`."""
    return Path(data_dir) / f"{task}_{split}.jsonl"


def task_source(spec: str, data_dir: Path | None, split: str) -> tuple[str, Path]:
    """`task` → the built world's file for `split`; `task=PATH` → PATH."""
    task, sep, path = spec.partition("=")
    task = task.strip()
    if sep:
        return task, Path(path)
    if data_dir is None:
        raise ConfigError(
            f"data {spec!r}: no tiny world to take the {task} {split} split from; build one "
            f"(`sdftlab world build`) or give a file: {task}=PATH"
        )
    return task, world_task_file(data_dir, task, split)
