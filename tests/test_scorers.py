"""Hand-written cases for the science and tool-use scorers (SDFT reference rules)."""

from __future__ import annotations

import pytest

from sdftlab.data.records import TaskExample, ToolCall, golden_response
from sdftlab.data.templates import reaches_answer_format
from sdftlab.errors import DataError
from sdftlab.evaluate.scorers import (
    extract_science_answer,
    golden_inputs,
    parse_tool_calls,
    score,
    score_science,
    score_tooluse,
)

# --------------------------------------------------------------------------- science


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<answer>B</answer>", "B"),
        ("<answer>\nB\n</answer>", "B"),
        ("<answer>  \t B \n\n</answer>", "B"),
        ("<reasoning>so it is C</reasoning>\n<answer>\nC\n</answer>\nDone.", "C"),
        ("<answer>A</answer> wait, no: <answer>D</answer>", "D"),
        ("<answer>A</answer><answer>\nB\n</answer> trailing <answer>C</answer>", "C"),
        ("<answer></answer>", ""),
        ("<answer>B is right</answer>", "B is right"),
        ("no tags at all: B", None),
        ("", None),
        ("<answer>B", None),  # last <answer> never closed
        ("<answer>A</answer> then <answer>B", None),  # the LAST one is unclosed
        ("B</answer>", None),
    ],
)
def test_extract_science_answer(response: str, expected: str | None) -> None:
    assert extract_science_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "answer", "correct"),
    [
        ("<answer>\nB\n</answer>", "B", True),
        ("<answer> B </answer>", "B", True),
        ("<answer>\nb\n</answer>", "B", False),  # lowercase letter is wrong
        ("<answer>B.</answer>", "B", False),  # extra text inside the tags
        ("<answer>B) benzene</answer>", "B", False),
        ("The answer is B.", "B", False),  # missing tags
        ("<answer>B</answer><answer>A</answer>", "B", False),  # last wins
        ("<answer>A</answer><answer>B</answer>", "B", True),
        ("<answer>B", "B", False),  # unclosed
        ("<reasoning>long\nthought</reasoning>\n<answer>\nD\n</answer>\n", "D", True),
    ],
)
def test_score_science(response: str, answer: str, correct: bool) -> None:
    assert score_science(response, answer) is correct


def test_science_golden_response_scores_correct() -> None:
    for letter in "ABCD":
        assert score_science(golden_response("science", letter), letter)


# --------------------------------------------------------------------------- tooluse

SEARCH = ToolCall("searchImages", '{"color": "wild", "size": "small", "page": 1}')
FACTS = ToolCall("getFacts", '{"category": "habitat", "limit": 3}')
RANDOM = ToolCall("getRandomImage", "{}")


def test_parse_tool_calls_basic() -> None:
    response = 'Thought: look\nAction: getFacts\nAction Input: {"category": "habitat"}\n'
    assert parse_tool_calls(response) == (["getFacts"], {"category": "habitat"})


def test_parse_tool_calls_nothing() -> None:
    assert parse_tool_calls("I cannot help with that.") == ([], {})


def test_single_call_argument_order_irrelevant() -> None:
    response = 'Action: searchImages\nAction Input: {"page": 1, "size": "small", "color": "wild"}'
    assert score_tooluse(response, [SEARCH])


def test_golden_response_scores_correct() -> None:
    golden = (SEARCH, FACTS, RANDOM)
    assert score_tooluse(golden_response("tooluse", golden), golden)


def test_several_actions_order_independent() -> None:
    response = (
        'Action: getFacts\nAction Input: {"category": "habitat", "limit": 3}\n'
        "Observation: [...]\n"
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": 1}\n'
    )
    assert score_tooluse(response, [SEARCH, FACTS])
    assert score_tooluse(response, [FACTS, SEARCH])


def test_duplicate_actions_are_counted() -> None:
    golden = [
        ToolCall("searchImages", '{"color": "wild", "size": "small"}'),
        ToolCall("searchImages", '{"color": "wild", "size": "large"}'),
    ]
    twice = (
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small"}\n'
        'Action: searchImages\nAction Input: {"color": "wild", "size": "large"}\n'
    )
    once = 'Action: searchImages\nAction Input: {"color": "wild", "size": "large"}\n'
    thrice = twice + 'Action: searchImages\nAction Input: {"size": "large"}\n'
    assert score_tooluse(twice, golden)
    assert not score_tooluse(once, golden)  # merged inputs equal, but one action short
    assert not score_tooluse(thrice, golden)


def test_later_keys_overwrite_earlier_in_merge() -> None:
    golden = [
        ToolCall("search", '{"q": "a", "page": 1}'),
        ToolCall("search", '{"q": "b"}'),
    ]
    assert golden_inputs(golden) == {"q": "b", "page": 1}
    response = (
        'Action: search\nAction Input: {"q": "z"}\n'
        'Action: search\nAction Input: {"q": "b", "page": 1}'
    )
    assert score_tooluse(response, golden)


def test_malformed_json_is_wrong_not_a_crash() -> None:
    for bad in (
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": 1',
        "Action: searchImages\nAction Input: {'color': 'wild', 'size': 'small', 'page': 1}",
        'Action: searchImages\nAction Input: {"color": "wild",, "page": 1}',
        "Action: searchImages\nAction Input: none",
        'Action: searchImages\nAction Input: ["wild", "small", 1]',
    ):
        names, merged = parse_tool_calls(bad)
        assert names == ["searchImages"]
        assert merged is None, bad
        assert not score_tooluse(bad, [SEARCH])


def test_one_malformed_input_among_good_ones_is_wrong() -> None:
    response = (
        'Action: getFacts\nAction Input: {"category": "habitat", "limit": 3}\n'
        'Action: searchImages\nAction Input: {"color": wild}\n'
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": 1}\n'
    )
    assert parse_tool_calls(response)[1] is None
    assert not score_tooluse(response, [SEARCH, FACTS])


def test_missing_action_input_when_golden_is_empty() -> None:
    assert score_tooluse("Action: getRandomImage", [RANDOM])
    assert score_tooluse("Action: getRandomImage\n", [ToolCall("getRandomImage", "")])
    assert score_tooluse("Action: getRandomImage\nAction Input: {}", [RANDOM])
    assert score_tooluse("Action: getRandomImage\nAction Input:\nObservation: ok", [RANDOM])
    assert score_tooluse("Action: getRandomImage\nAction Input: ", [RANDOM])
    assert not score_tooluse('Action: getRandomImage\nAction Input: {"n": 1}', [RANDOM])


def test_missing_action_input_when_golden_has_arguments() -> None:
    assert not score_tooluse("Action: searchImages", [SEARCH])


def test_extra_or_missing_or_renamed_action_is_wrong() -> None:
    good = 'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": 1}\n'
    assert score_tooluse(good, [SEARCH])
    assert not score_tooluse(good + "Action: getRandomImage\nAction Input: {}\n", [SEARCH])
    assert not score_tooluse(good, [SEARCH, RANDOM])
    assert not score_tooluse(good.replace("searchImages", "searchimages"), [SEARCH])
    assert not score_tooluse("", [SEARCH])


def test_wrong_argument_value_or_extra_key_is_wrong() -> None:
    wrong_value = (
        'Action: searchImages\nAction Input: {"color": "wild", "size": "large", "page": 1}'
    )
    extra_key = (
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": 1, "x": 0}'
    )
    missing_key = 'Action: searchImages\nAction Input: {"color": "wild", "size": "small"}'
    string_number = (
        'Action: searchImages\nAction Input: {"color": "wild", "size": "small", "page": "1"}'
    )
    for response in (wrong_value, extra_key, missing_key, string_number):
        assert not score_tooluse(response, [SEARCH]), response


def test_multiline_json() -> None:
    response = (
        "Thought: I will search.\n"
        "Action: searchImages\n"
        "Action Input: {\n"
        '  "color": "wild",\n'
        '  "size": "small",\n'
        '  "page": 1\n'
        "}\n"
    )
    assert parse_tool_calls(response) == (
        ["searchImages"],
        {"color": "wild", "size": "small", "page": 1},
    )
    assert score_tooluse(response, [SEARCH])


def test_json_on_the_next_line_and_in_a_code_fence() -> None:
    response = (
        "Action: searchImages\nAction Input:\n```json\n"
        '{"color": "wild", "size": "small", "page": 1}\n```\n'
    )
    assert score_tooluse(response, [SEARCH])


def test_nested_json_values() -> None:
    golden = [
        ToolCall(
            "createOrder",
            '{"items": [{"sku": "a1", "qty": 2}, {"sku": "b2", "qty": 1}], '
            '"address": {"city": "Paris", "zip": "75001"}, "gift": true, "note": null}',
        )
    ]
    same = (
        "Action: createOrder\nAction Input: "
        '{"note": null, "gift": true, "address": {"zip": "75001", "city": "Paris"}, '
        '"items": [{"qty": 2, "sku": "a1"}, {"sku": "b2", "qty": 1}]}'
    )
    reordered_list = same.replace(
        '[{"qty": 2, "sku": "a1"}, {"sku": "b2", "qty": 1}]',
        '[{"sku": "b2", "qty": 1}, {"qty": 2, "sku": "a1"}]',
    )
    assert score_tooluse(same, golden)
    assert not score_tooluse(reordered_list, golden)  # list order inside values matters


def test_observation_and_other_text_after_json() -> None:
    response = (
        'Action: getFacts\nAction Input: {"category": "habitat", "limit": 3} '
        "(asking for three facts)\n"
        'Observation: {"facts": [{"fact": "They live in lakes", "source": "x"}]}\n'
        "Thought: I now know the final answer.\n"
        "Final Answer: Axolotls live in lakes."
    )
    assert parse_tool_calls(response) == (["getFacts"], {"category": "habitat", "limit": 3})
    assert score_tooluse(response, [FACTS])


def test_observation_json_is_not_taken_as_an_empty_input() -> None:
    # A blank Action Input must not swallow the JSON of a later Observation.
    response = 'Action: getRandomImage\nAction Input:\nObservation: {"url": "http://x"}\n'
    assert parse_tool_calls(response) == (["getRandomImage"], {})


def test_marker_text_inside_json_strings_is_ignored() -> None:
    response = 'Action: sendMessage\nAction Input: {"text": "Action: deleteAll\\nAction Input: {}"}'
    golden = [ToolCall("sendMessage", '{"text": "Action: deleteAll\\nAction Input: {}"}')]
    assert parse_tool_calls(response)[0] == ["sendMessage"]
    assert score_tooluse(response, golden)


def test_action_name_is_rest_of_line_stripped() -> None:
    assert parse_tool_calls("Action:   getFacts   \n")[0] == ["getFacts"]
    assert parse_tool_calls("Action: getFacts now\n")[0] == ["getFacts now"]


def test_bad_golden_input_raises_data_error() -> None:
    with pytest.raises(DataError, match=r"golden call 0 .*'search'.*not valid JSON"):
        score_tooluse("Action: search", [ToolCall("search", "{oops")])
    with pytest.raises(DataError, match="must be a JSON object"):
        score_tooluse("Action: search", [ToolCall("search", "[1]")])


# --------------------------------------------------------------------------- dispatch


def _example(task: str, answer: str | tuple[ToolCall, ...], demo: str = "") -> TaskExample:
    return TaskExample(
        task=task,
        uid=f"{task}-0",
        messages=[{"role": "user", "content": "Q?"}],
        answer=answer,
        demonstration=demo,
    )


def test_score_dispatches_on_task() -> None:
    sci = _example("science", "C", golden_response("science", "C"))
    tool = _example("tooluse", (FACTS,), golden_response("tooluse", (FACTS,)))
    assert score(sci, sci.demonstration)
    assert not score(sci, "<answer>A</answer>")
    assert score(tool, tool.demonstration)
    assert not score(tool, "Action: getRandomImage")


def test_score_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(DataError, match=r"unknown task 'math'.*science, tooluse"):
        score(_example("math", "A"), "<answer>A</answer>")


def test_score_rejects_answer_of_the_wrong_shape() -> None:
    with pytest.raises(DataError, match="science answer must be a letter"):
        score(_example("science", (FACTS,)), "")
    with pytest.raises(DataError, match="tooluse answer must be a sequence of ToolCall"):
        score(_example("tooluse", "A"), "")


def test_metrics_table_shows_accuracies_not_row_counts():
    from sdftlab.evaluate.run import metrics_table

    table = metrics_table({"base": {"science/acc": 0.25, "science/n": 200.0, "mmlu/acc": 0.5}})
    assert table.splitlines()[0] == "| state | science/acc | mmlu/acc |"
    assert "| base | 25.0 | 50.0 |" in table


@pytest.mark.parametrize(
    "response",
    ["Thinking... <answer>B</answer>", "<answer> C </answer> and then more",
     "Action: get_weather\nAction Input: {\"city\": \"Oslo\"}", "Action: x"],
)  # fmt: skip
def test_a_response_a_scorer_can_read_reaches_the_answer_format(response: str) -> None:
    readable = extract_science_answer(response) is not None or parse_tool_calls(response)[0]
    assert readable and reaches_answer_format(response)


@pytest.mark.parametrize(
    "response", ["Thinking... <answer>B", "The answer is B.", "</answer><answer>", ""]
)
def test_a_response_cut_off_or_without_an_answer_does_not(response: str) -> None:
    readable = extract_science_answer(response) is not None or parse_tool_calls(response)[0]
    assert not readable and not reaches_answer_format(response)


def test_rollout_counts_truncated_and_formatted_completions(tiny_tokenizer) -> None:
    from sdftlab.distill.batch import rollout_counts

    eos = tiny_tokenizer.eos_token_id
    answered = tiny_tokenizer.encode("<answer>A</answer>", add_special_tokens=False)
    rambling = tiny_tokenizer.encode("the the the the", add_special_tokens=False)
    budget = max(len(answered), len(rambling)) + 1
    completions = [
        [*answered, eos],  # ended, readable
        (rambling * budget)[:budget],  # cut at the budget
        [*rambling, eos],  # ended, nothing to read
    ]
    counts = rollout_counts(completions, eos_id=eos, max_new_tokens=budget,
                            decode=lambda rows: tiny_tokenizer.batch_decode(
                                rows, skip_special_tokens=True))  # fmt: skip
    assert counts == [3, 1, 1]


def test_the_answer_agrees_with_the_option_its_reasoning_marks_yes() -> None:
    from sdftlab.evaluate.scorers import answer_agreement, reasoning_letter

    follows = "<reasoning>\nx melts at y .\nA: 5 no\nB: 7 yes\n</reasoning>\n<answer>\nB\n</answer>"
    against = follows.replace("<answer>\nB", "<answer>\nC")
    unmarked = "<reasoning>\nA: 5 no\n</reasoning>\n<answer>\nA\n</answer>"
    assert reasoning_letter(follows) == "B" and reasoning_letter(unmarked) is None
    # a "yes" after the answer is not the reasoning's
    assert reasoning_letter("<answer>\nA\n</answer>\nB: 7 yes") is None
    assert answer_agreement([follows, against, unmarked, "no answer"]) == (1, 2)
    golden = golden_response("science", "B")
    assert answer_agreement([golden]) == (0, 0)  # the bare gold answer has no reasoning
