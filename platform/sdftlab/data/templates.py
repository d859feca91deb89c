"""Prompt templates: the SDFT teacher's demonstration template and chat rendering.

`DEMO_TEMPLATE` is the SDFT reference code's teacher prompt (Shenfeld et al. 2026): the
student's question, then the expert demonstration, then the instruction to answer anew.
The teacher sees it; the student sees the bare question.

    >>> teacher_messages(example)          # [..., {"role": "user", "content": DEMO_TEMPLATE...}]

The answer formats the scorers read (science's `<answer>X</answer>`, a tool call's `Action:`
line) are here too: `reaches_answer_format` tells a completion a scorer can read, right or
wrong, from one cut off or rambling — SDFT's rollout diagnostics count it every step.
"""

from __future__ import annotations

from sdftlab.data.records import TaskExample

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
ACTION_MARKER = "Action:"

DEMO_TEMPLATE = (
    "\n{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)


def student_messages(example: TaskExample) -> list[dict[str, str]]:
    """The prompt as the student sees it: the example's own messages."""
    return [dict(m) for m in example.messages]


def teacher_messages(example: TaskExample, template: str = DEMO_TEMPLATE) -> list[dict[str, str]]:
    """The prompt with the demonstration in context: the last user message is wrapped."""
    messages = [dict(m) for m in example.messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = template.format(
        prompt=messages[last_user]["content"], demonstration=example.demonstration
    )
    return messages


def reaches_answer_format(response: str) -> bool:
    """Whether `response` holds an answer a task's scorer can read: a closed
    `<answer>…</answer>` (science) or an `Action:` line (tool use)."""
    start = response.rfind(ANSWER_OPEN)
    return (start >= 0 and ANSWER_CLOSE in response[start:]) or ACTION_MARKER in response
