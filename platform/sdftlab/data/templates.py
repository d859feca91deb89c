"""Prompt templates: the SDFT teacher's demonstration template and chat rendering.

`DEMO_TEMPLATE` is the SDFT reference code's teacher prompt (Shenfeld et al. 2026): the
student's question, then the expert demonstration, then the instruction to answer anew.
The teacher sees it; the student sees the bare question.

    >>> teacher_messages(example)          # [..., {"role": "user", "content": DEMO_TEMPLATE...}]
"""

from __future__ import annotations

from sdftlab.data.records import TaskExample

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
