"""Loaders on the real SDFT reference eval sets, format round trips, and every error case."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdftlab.data.loaders import (
    TASK_FIELDS,
    iter_jsonl,
    load_task_file,
    write_task_file,
)
from sdftlab.data.records import TaskExample, ToolCall, golden_response
from sdftlab.errors import ConfigError, DataError
from sdftlab.evaluate.scorers import score

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sdft_reference_eval"
SCIENCE_DIR = REFERENCE / "science_data" / "eval_data"
TOOLUSE_DIR = REFERENCE / "tooluse_data" / "eval_data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"reference eval data missing: {path} does not exist. These tests need the real "
            "SDFT eval sets (shared/data/sdft_reference_eval next to the repository); restore "
            "that folder instead of skipping."
        )
    return path


@pytest.fixture(scope="module")
def science() -> list[TaskExample]:
    return load_task_file(_require(SCIENCE_DIR), "science")


@pytest.fixture(scope="module")
def tooluse() -> list[TaskExample]:
    return load_task_file(_require(TOOLUSE_DIR), "tooluse")


@pytest.fixture(scope="module")
def science_rows() -> list[dict[str, Any]]:
    import datasets

    return datasets.load_from_disk(str(_require(SCIENCE_DIR))).to_list()


@pytest.fixture(scope="module")
def tooluse_rows() -> list[dict[str, Any]]:
    import datasets

    return datasets.load_from_disk(str(_require(TOOLUSE_DIR))).to_list()


# --------------------------------------------------------------------------- real data


def test_real_science_loads_507_rows(science: list[TaskExample]) -> None:
    assert len(science) == 507
    assert {ex.answer for ex in science} == {"A", "B", "C", "D"}
    assert len({ex.uid for ex in science}) == 507
    first = science[0]
    assert first.task == "science" and first.uid == "science-0"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert "<answer>" in first.messages[0]["content"]
    assert first.prompt_text.startswith("Which of the following")
    assert first.demonstration == golden_response("science", first.answer)


def test_real_tooluse_loads_97_rows(tooluse: list[TaskExample]) -> None:
    assert len(tooluse) == 97
    first = tooluse[0]
    assert first.task == "tooluse" and first.uid == "tooluse-0"
    assert len(first.messages) == 1 and first.messages[0]["role"] == "user"
    assert first.prompt_text.startswith("Your task is to answer the user's question")
    assert first.answer == (ToolCall("getRandomAxolotlImage", "{}"),)
    assert set(first.meta) == {"name", "description", "nl_documentation", "instruction"}
    assert first.meta["name"] == "Axolotl"
    assert all(isinstance(ex.answer, tuple) and ex.answer for ex in tooluse)
    assert sum(len(ex.answer) for ex in tooluse) == 143  # golden calls in the eval set


def test_real_limit_keeps_the_first_rows(science: list[TaskExample]) -> None:
    assert load_task_file(SCIENCE_DIR, "science", limit=5) == science[:5]
    assert len(load_task_file(TOOLUSE_DIR, "tooluse", limit=1000)) == 97


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit_is_a_config_error(limit: Any) -> None:
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        load_task_file(SCIENCE_DIR, "science", limit=limit)


def test_golden_demonstrations_score_100_percent(
    science: list[TaskExample], tooluse: list[TaskExample]
) -> None:
    for examples in (science, tooluse):
        wrong = [ex.uid for ex in examples if not score(ex, ex.demonstration)]
        assert wrong == []
        assert all(score(ex, golden_response(ex.task, ex.answer)) for ex in examples)


def test_wrong_responses_score_zero(science: list[TaskExample], tooluse: list[TaskExample]) -> None:
    for ex in science[:100]:
        other = "ABCD"[("ABCD".index(ex.answer) + 1) % 4]
        assert not score(ex, golden_response("science", other))
        assert not score(ex, ex.answer)  # the bare letter, no tags
        assert not score(ex, f"<answer>{ex.answer.lower()}</answer>")
    for ex in tooluse:
        calls: tuple[ToolCall, ...] = ex.answer  # type: ignore[assignment]
        renamed = tuple(dataclasses.replace(c, action=c.action + "X") for c in calls)
        extra = (*calls, ToolCall("notATool", "{}"))
        assert not score(ex, golden_response("tooluse", renamed))
        assert not score(ex, golden_response("tooluse", extra))
        assert not score(ex, golden_response("tooluse", calls).replace("}", ",}", 1))
        assert not score(ex, "I don't know.")


def test_real_tooluse_wrong_argument_scores_zero(tooluse: list[TaskExample]) -> None:
    with_args = [ex for ex in tooluse if any(json.loads(c.action_input or "{}") for c in ex.answer)]
    assert len(with_args) > 50
    for ex in with_args:
        calls = [json.loads(c.action_input or "{}") for c in ex.answer]  # type: ignore[union-attr]
        calls[-1] = {**calls[-1], "__unexpected__": 1}
        response = "\n".join(
            f"Action: {c.action}\nAction Input: {json.dumps(args)}"
            for c, args in zip(ex.answer, calls, strict=True)  # type: ignore[arg-type]
        )
        assert not score(ex, response)


# --------------------------------------------------------------------------- round trips


def _repr_rows(rows: list[dict[str, Any]], *fields: str) -> list[dict[str, Any]]:
    """The rows with ``fields`` stored as Python repr strings, as the reference code does."""
    return [{**row, **{f: repr(row[f]) for f in fields}} for row in rows]


@pytest.mark.parametrize("as_repr", [False, True], ids=["lists", "repr-strings"])
def test_jsonl_round_trip_science(
    tmp_path: Path, science: list[TaskExample], science_rows: list[dict[str, Any]], as_repr: bool
) -> None:
    rows = _repr_rows(science_rows, "prompt") if as_repr else science_rows
    path = tmp_path / "science.jsonl"
    write_task_file(path, rows)
    assert [row for _, row in iter_jsonl(path)] == rows
    assert load_task_file(path, "science") == science


@pytest.mark.parametrize("as_repr", [False, True], ids=["lists", "repr-strings"])
def test_jsonl_round_trip_tooluse(
    tmp_path: Path, tooluse: list[TaskExample], tooluse_rows: list[dict[str, Any]], as_repr: bool
) -> None:
    rows = _repr_rows(tooluse_rows, "golden_answer") if as_repr else tooluse_rows
    path = tmp_path / "tooluse.jsonl"
    write_task_file(path, rows)
    assert [row for _, row in iter_jsonl(path)] == rows
    assert load_task_file(path, "tooluse") == tooluse


def test_parquet_and_json_round_trip(
    tmp_path: Path,
    science: list[TaskExample],
    tooluse: list[TaskExample],
    science_rows: list[dict[str, Any]],
    tooluse_rows: list[dict[str, Any]],
) -> None:
    for task, rows, expected in (
        ("science", science_rows, science),
        ("tooluse", tooluse_rows, tooluse),
    ):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{task}.parquet")
        assert load_task_file(tmp_path / f"{task}.parquet", task) == expected
        (tmp_path / f"{task}.json").write_text(json.dumps(rows), encoding="utf-8")
        assert load_task_file(tmp_path / f"{task}.json", task) == expected


def test_optional_fields_id_golden_response_dict_input_plain_prompt(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    write_task_file(
        path,
        [
            {
                "id": 17,
                "prompt": "Which is a noble gas?\nA: Ne\nB: Na",
                "answer": "A",
                "golden_response": ["<reasoning>", "Neon.", "</reasoning>", "<answer>A</answer>"],
            },
            {
                "uid": "q-2",
                "prompt": json.dumps([{"role": "user", "content": "Q2"}]),
                "answer": " B\n",
                "golden_response": "<answer>B</answer>",
            },
        ],
    )
    first, second = load_task_file(path, "science")
    assert first.uid == "17"
    assert first.messages == [{"role": "user", "content": "Which is a noble gas?\nA: Ne\nB: Na"}]
    assert first.demonstration == "<reasoning>\nNeon.\n</reasoning>\n<answer>A</answer>"
    assert score(first, first.demonstration)
    assert (second.uid, second.answer, second.prompt_text) == ("q-2", "B", "Q2")

    tool_path = tmp_path / "tool.jsonl"
    write_task_file(
        tool_path,
        [
            {
                "prompt": "Question: weather in Paris?",
                "golden_answer": [
                    {"Action": "getWeather", "Action_Input": {"city": "Paris"}},
                    {"Action": "ping", "Action_Input": ""},
                ],
            }
        ],
    )
    (ex,) = load_task_file(tool_path, "tooluse")
    assert ex.answer == (ToolCall("getWeather", '{"city": "Paris"}'), ToolCall("ping", ""))
    assert ex.meta == {}
    assert score(ex, ex.demonstration)


def test_write_task_file_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.jsonl"
    write_task_file(path, [{"a": 1}])
    write_task_file(path, [{"a": 2}, {"b": "é"}])
    assert path.read_text(encoding="utf-8") == '{"a": 2}\n{"b": "é"}\n'
    with pytest.raises(DataError, match=r"rows\.jsonl row 2: not JSON-serialisable"):
        write_task_file(path, [{"a": 3}, {"b": object()}])
    assert path.read_text(encoding="utf-8") == '{"a": 2}\n{"b": "é"}\n'  # untouched
    assert os.listdir(path.parent) == ["rows.jsonl"]  # no temp file left behind
    with pytest.raises(DataError, match=r"rows\.csv: write_task_file writes JSONL"):
        write_task_file(tmp_path / "rows.csv", [{"a": 1}])


def test_iter_jsonl_skips_blank_lines_and_numbers_from_one(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


# --------------------------------------------------------------------------- errors

SCI_OK = {"prompt": "Q?\nA: x\nB: y", "answer": "A"}
TOOL_OK = {"prompt": "Question: hi", "golden_answer": "[{'Action': 'a', 'Action_Input': '{}'}]"}


def _jsonl(tmp_path: Path, rows: list[Any], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_task_fields() -> None:
    assert TASK_FIELDS == {"science": ("prompt", "answer"), "tooluse": ("prompt", "golden_answer")}


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(SCI_OK) + "\n\n" + '{"prompt": "Q", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON") as err:
        load_task_file(path, "science")
    assert str(path) in str(err.value) and "one complete JSON object" in str(err.value)
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON"):
        list(iter_jsonl(path))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [SCI_OK, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object, got list"):
        load_task_file(path, "science")


def test_missing_field_names_file_line_field_and_requirement(tmp_path: Path) -> None:
    rows: list[Any] = [SCI_OK] * 6 + [{"prompt": "Q?"}]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_task_file(path, "science")
    assert str(err.value) == (
        f"{path} line 7: missing field 'answer' (science rows need 'prompt' and 'answer')"
    )
    tool_path = _jsonl(tmp_path, [{"prompt": "Q"}], "tool.jsonl")
    with pytest.raises(
        DataError,
        match=r"tool\.jsonl line 1: missing field 'golden_answer' "
        r"\(tooluse rows need 'prompt' and 'golden_answer'\)",
    ):
        load_task_file(tool_path, "tooluse")


def test_missing_field_in_json_and_parquet_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([SCI_OK, {"answer": "B"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.json row 2: missing field 'prompt'"):
        load_task_file(path, "science")
    pq_path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "answer": None}]), pq_path)
    with pytest.raises(DataError, match=r"rows\.parquet row 1: missing field 'answer'"):
        load_task_file(pq_path, "science")


def test_unknown_task_lists_known_tasks(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [SCI_OK])
    with pytest.raises(DataError, match=r"unknown task 'math'; known tasks: science, tooluse"):
        load_task_file(path, "math")


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_task_file(missing, "science")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        list(iter_jsonl(missing))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,answer\nQ,A\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"train\.csv: unsupported file type '\.csv'; use one of "
        r"\.jsonl, \.json, \.parquet",
    ):
        load_task_file(path, "science")


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"a directory without dataset_info\.json or state\.json"):
        load_task_file(tmp_path, "science")


def test_dataset_dict_directory_asks_for_one_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([SCI_OK])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \[train\]; pass one split"):
        load_task_file(tmp_path / "dd", "science")
    assert len(load_task_file(tmp_path / "dd" / "train", "science")) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_task_file(path, "science")


def test_empty_json_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json: no rows"):
        load_task_file(tmp_path / "empty.json", "science")
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet: no rows"):
        load_task_file(tmp_path / "empty.parquet", "science")


def test_json_that_is_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(SCI_OK), encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.json: expected a JSON list of row objects"):
        load_task_file(path, "science")


@pytest.mark.parametrize("answer", ["AB", "a", "", "1", 1, "(A)", ["A"]])
def test_science_answer_not_a_single_letter(tmp_path: Path, answer: Any) -> None:
    path = _jsonl(tmp_path, [SCI_OK, {**SCI_OK, "answer": answer}])
    with pytest.raises(
        DataError,
        match=r"train\.jsonl line 2: field 'answer' must be a single "
        r"capital letter A-Z",
    ):
        load_task_file(path, "science")


@pytest.mark.parametrize(
    "golden",
    [
        "[{'Action': 'a', 'Action_Input': '{}'}",  # unbalanced repr
        "not a list at all",
        "[]",
        "[{'Action_Input': '{}'}]",  # no Action
        "['a']",
    ],
)
def test_golden_answer_that_does_not_parse(tmp_path: Path, golden: str) -> None:
    path = _jsonl(tmp_path, [TOOL_OK, {**TOOL_OK, "golden_answer": golden}])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: field 'golden_answer'"):
        load_task_file(path, "tooluse")


@pytest.mark.parametrize(
    ("action_input", "why"),
    [
        ('{"q": "x",}', "is not valid JSON"),
        ("{'q': 'x'}", "is not valid JSON"),
        ('["x"]', "must be a JSON object"),
        (3, "must be a JSON string or an object"),
    ],
)
def test_golden_action_input_not_valid_json(tmp_path: Path, action_input: Any, why: str) -> None:
    golden = [{"Action": "a", "Action_Input": "{}"}, {"Action": "b", "Action_Input": action_input}]
    path = _jsonl(tmp_path, [{**TOOL_OK, "golden_answer": golden}])
    with pytest.raises(
        DataError,
        match=rf"train\.jsonl line 1: field 'golden_answer' call 1: "
        rf"'Action_Input' {why}",
    ):
        load_task_file(path, "tooluse")


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        ([], "field 'prompt' must be a string or a non-empty list"),
        (3, "field 'prompt' must be a string or a non-empty list"),
        ([{"role": "user"}], "field 'prompt' message 0 must be a dict"),
        ("[{'content': 'Q'}]", "field 'prompt' message 0 must be a dict"),
        ([{"role": "system", "content": "S"}], "field 'prompt' has no 'user' message"),
    ],
)
def test_bad_prompt(tmp_path: Path, prompt: Any, why: str) -> None:
    path = _jsonl(tmp_path, [{**SCI_OK, "prompt": prompt}])
    with pytest.raises(DataError, match=rf"train\.jsonl line 1: {why}"):
        load_task_file(path, "science")


def test_bad_golden_response(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{**SCI_OK, "golden_response": [1, 2]}])
    with pytest.raises(DataError, match=r"line 1: field 'golden_response' must be a list of str"):
        load_task_file(path, "science")


def test_limit_validates_only_kept_rows(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [SCI_OK, SCI_OK, {"broken": True}])
    with path.open("a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    assert len(load_task_file(path, "science", limit=2)) == 2
    with pytest.raises(DataError, match="line 3: missing field 'prompt'"):
        load_task_file(path, "science", limit=3)
    with pytest.raises(DataError, match="line 4: malformed JSON"):
        load_task_file(path, "science")
