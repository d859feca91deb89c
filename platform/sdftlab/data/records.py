"""The one record type every task loader produces.

A `TaskExample` is a prompt (chat messages), the gold answer in the form the task's scorer
needs, and the expert demonstration (a gold response text) that SFT trains on and that an
SDFT teacher sees in context. Real data (ToolAlpaca, SciKnowEval, the SDFT reference eval
sets) and the embedded tiny world both load into this shape.

    >>> ex = TaskExample(task="science", uid="s-1",
    ...                  messages=[{"role": "user", "content": "Q?"}],
    ...                  answer="B", demonstration="<answer>\\nB\\n</answer>")
    >>> ex.prompt_text
    'Q?'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sdftlab.errors import DataError

TaskName = Literal["science", "tooluse"]
TASK_NAMES: tuple[str, ...] = ("science", "tooluse")


@dataclass(frozen=True)
class ToolCall:
    """One golden tool call: the action name and its input as a JSON string."""

    action: str
    action_input: str

    def as_dict(self) -> dict[str, str]:
        return {"Action": self.action, "Action_Input": self.action_input}


@dataclass(frozen=True)
class TaskExample:
    """One prompt of a task with its gold answer and demonstration.

    - science: `answer` is the option letter ("A".."D").
    - tooluse: `answer` is the tuple of golden `ToolCall`s.
    `demonstration` is a full gold response in the task's output format.
    """

    task: str
    uid: str
    messages: list[dict[str, str]]
    answer: str | tuple[ToolCall, ...]
    demonstration: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The last user message: what the demonstration template wraps."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def to_json(self) -> str:
        record = asdict(self)
        if self.task == "tooluse":
            record["answer"] = [c.as_dict() for c in self.answer]  # type: ignore[union-attr]
        return json.dumps(record, ensure_ascii=False)


def golden_response(task: str, answer: str | tuple[ToolCall, ...]) -> str:
    """The canonical gold response text for an answer, in the reference output format."""
    if task == "science":
        return f"<answer>\n{answer}\n</answer>"
    calls: tuple[ToolCall, ...] = answer  # type: ignore[assignment]
    return "\n".join(f"Action: {c.action}\nAction Input: {c.action_input}" for c in calls)


GOLDEN_INPUT_FIX = "give a JSON object string such as '{\"q\": \"x\"}', or '' for no input"


def parse_json_object(
    text: str,
    where: str,
    *,
    invalid: str = "is not valid JSON",
    not_object: str = "must be a JSON object",
    fix: str = 'give a JSON object such as \'{"q": "x"}\'',
) -> dict[str, Any]:
    """`text` parsed as a JSON object, or one `DataError`: `{where} {invalid} (the parser's
    reason); {fix}`, or `{where} {not_object}, got <type>; {fix}`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} {invalid} ({exc.msg} at column {exc.colno}); {fix}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{where} {not_object}, got {type(value).__name__}; {fix}")
    return value
