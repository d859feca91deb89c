"""Score a model response against a task's gold answer, with the SDFT reference rules.

Two tasks, scored exactly as the SDFT reference code (Shenfeld et al. 2026) scores its
evaluation sets (the rules are re-implemented here, not copied):

- **science** (SciKnowEval-style multiple choice): take the text after the LAST
  ``<answer>`` and before the next ``</answer>``, strip it, and compare it exactly (case
  included) with the gold letter. No ``<answer>`` tag, or a last ``<answer>`` with no
  ``</answer>`` after it, is wrong.
- **tooluse** (ToolAlpaca-style ReAct): the multiset of action names (the rest of the line
  after each ``Action:``, stripped) must equal the multiset of golden actions, and all
  ``Action Input:`` JSON objects of the response, merged into one dict in order (later
  keys overwrite earlier ones), must equal the golden inputs merged the same way. Python
  ``==`` compares the merged dicts, so key order is irrelevant.

Details of the tool-use parser:

- The response is scanned left to right for ``Action:`` and ``Action Input:`` markers; a
  decoded JSON object is skipped as a whole, so marker-like text inside a JSON string
  does not count.
- The JSON object after ``Action Input:`` is decoded with ``json.JSONDecoder().raw_decode``
  from the first ``{`` after the marker, so it may span several lines and be followed by
  other text (``Observation: ...``, the next ``Action:``, a closing code fence).
- The ``{`` must come before the next field marker (``Action:``, ``Action Input:``,
  ``Observation:``, ``Thought:``, ``Final Answer:``). If there is none: a blank input counts
  as ``{}``; anything else (``Action Input: none``) is malformed.
- Malformed JSON, or JSON that is not an object, makes the whole response wrong (the
  parser returns ``None`` for the inputs; it never raises).
- Golden ``Action_Input`` strings that are empty or ``{}`` count as ``{}``; a response with
  no ``Action Input:`` at all therefore matches golden calls whose inputs are all empty.

Example:

    >>> score_science("<reasoning>...</reasoning>\\n<answer>\\n B \\n</answer>", "B")
    True
    >>> golden = (ToolCall("search", '{"q": "cats", "page": 1}'),)
    >>> score_tooluse('Action: search\\nAction Input: {"page": 1, "q": "cats"}', golden)
    True
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sdftlab.data.records import (
    GOLDEN_INPUT_FIX,
    TASK_NAMES,
    TaskExample,
    ToolCall,
    parse_json_object,
)
from sdftlab.data.templates import ANSWER_CLOSE, ANSWER_OPEN
from sdftlab.errors import DataError

_MARKER_RE = re.compile(r"Action( Input)?:")
_FIELD_RE = re.compile(r"(?:Action(?: Input)?|Observation|Thought|Final Answer):")
_DECODER = json.JSONDecoder()

# --------------------------------------------------------------------------- science


def extract_science_answer(response: str) -> str | None:
    """The stripped text between the last ``<answer>`` and the next ``</answer>``.

    None when there is no ``<answer>`` or the last one is never closed.
    """
    start = response.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = response.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    return response[start:end].strip()


def score_science(response: str, answer: str) -> bool:
    """True iff the extracted answer equals the gold letter exactly (case-sensitive)."""
    return extract_science_answer(response) == answer


_MARKED_YES_RE = re.compile(r"(?m)^\s*([A-Z]):[^\n]*\byes\s*$")


def reasoning_letter(response: str) -> str | None:
    """The option the reasoning before the last ``<answer>`` marks ``yes`` (its last such
    line, ``B: rock yes``, the tiny world's science format), or None where it marks none."""
    end = response.rfind(ANSWER_OPEN)
    marked = _MARKED_YES_RE.findall(response[: end if end >= 0 else len(response)])
    return marked[-1] if marked else None


def answer_agreement(responses: Sequence[str]) -> tuple[int, int]:
    """(agreeing, both): of the responses with a letter in ``<answer>`` and an option their
    reasoning marks ``yes``, how many name the same letter — whether a model answers by its
    own reasoning."""
    pairs = [(reasoning_letter(r), extract_science_answer(r)) for r in responses]
    both = [(m, a) for m, a in pairs if m is not None and a is not None]
    return sum(m == a for m, a in both), len(both)


# --------------------------------------------------------------------------- tooluse


def _line_rest(text: str, pos: int) -> tuple[str, int]:
    """The text from ``pos`` to the end of its line, and the position after the line."""
    end = text.find("\n", pos)
    if end < 0:
        return text[pos:], len(text)
    return text[pos:end], end + 1


def _parse_input(text: str, pos: int) -> tuple[dict[str, Any] | None, int]:
    """Decode the Action Input starting at ``pos`` (just after the marker).

    Returns (the object, or None if malformed; the position to continue scanning from).
    """
    boundary = _FIELD_RE.search(text, pos)
    stop = boundary.start() if boundary else len(text)
    brace = text.find("{", pos, stop)
    if brace < 0:
        return ({} if not text[pos:stop].strip() else None), stop
    try:
        value, end = _DECODER.raw_decode(text, brace)
    except json.JSONDecodeError:
        return None, brace + 1
    return (value if isinstance(value, dict) else None), end


def parse_tool_calls(response: str) -> tuple[list[str], dict[str, Any] | None]:
    """Action names in order, and all Action Inputs merged (None if any is malformed)."""
    names: list[str] = []
    merged: dict[str, Any] | None = {}
    pos = 0
    while (match := _MARKER_RE.search(response, pos)) is not None:
        if match.group(1) is None:  # "Action:"
            name, pos = _line_rest(response, match.end())
            names.append(name.strip())
            continue
        value, pos = _parse_input(response, match.end())
        if value is None:
            merged = None
        elif merged is not None:
            merged.update(value)
    return names, merged


def golden_inputs(golden: Sequence[ToolCall]) -> dict[str, Any]:
    """The golden Action_Inputs parsed and merged in order; empty strings count as ``{}``."""
    merged: dict[str, Any] = {}
    for i, call in enumerate(golden):
        text = call.action_input.strip()
        if not text:
            continue
        where = f"golden call {i} ({call.action!r}): Action_Input"
        merged.update(parse_json_object(text, where, fix=GOLDEN_INPUT_FIX))
    return merged


def score_tooluse(response: str, golden: Sequence[ToolCall]) -> bool:
    """True iff action multisets match and the merged inputs equal the merged golden inputs."""
    names, merged = parse_tool_calls(response)
    if merged is None:
        return False
    if Counter(names) != Counter(call.action for call in golden):
        return False
    return merged == golden_inputs(golden)


# --------------------------------------------------------------------------- dispatch


def score(example: TaskExample, response: str) -> bool:
    """Score ``response`` with the rule of ``example.task``."""
    if example.task == "science":
        if not isinstance(example.answer, str):
            raise DataError(
                f"example {example.uid!r}: a science answer must be a letter string, "
                f"got {type(example.answer).__name__}"
            )
        return score_science(response, example.answer)
    if example.task == "tooluse":
        if isinstance(example.answer, str):
            raise DataError(
                f"example {example.uid!r}: a tooluse answer must be a sequence of ToolCall, "
                "got str; load it with sdftlab.data.loaders.load_task_file"
            )
        return score_tooluse(response, example.answer)
    raise DataError(
        f"example {example.uid!r}: unknown task {example.task!r}; "
        f"known tasks: {', '.join(TASK_NAMES)}"
    )
