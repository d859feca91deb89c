"""Seeded generators of the tiny world's data, in the real formats.

Four kinds of evaluation data, each written in the format of the real set it stands in for,
so the same loaders, scorers and lm-eval task files read both:

- **science** (SciKnowEval as used by the SDFT reference code): `prompt` is a chat-message
  list (system + user), the user message a four-option question; `answer` is the letter;
  `golden_response` a list of lines (`<reasoning>` fact, `<answer>` letter). The facts are
  invented compounds and their properties: nothing in pretraining teaches them, so only a
  model fine-tuned on science (the "expert") knows them.
- **tooluse** (ToolAlpaca): `prompt` lists one API's functions and their parameters and ends
  with `Question: <instruction>`; `golden_answer` is a list of
  `{"Action": name, "Action_Input": "<json>"}`; `golden_response` the `Action:` /
  `Action Input:` lines.
- **mmlu** (`cais/mmlu` columns): `question`, `choices` (4), `answer` (int), `subject`.
- **winogrande** (`allenai/winogrande` columns): `sentence` with `_`, `option1`, `option2`,
  `answer` "1"/"2".

Pretraining text (`pretrain_documents`) mixes declarative general-knowledge sentences,
MMLU-format questions, Winogrande-style sentences, copy spans (the curriculum that makes
in-context copying emerge), and general Q&A with a demonstration in context in the SDFT
teacher template — so the base model learns to use a demonstration, which is what makes it
a usable SDFT teacher. Science and tool-use data never appear in pretraining.

    >>> world = WorldFacts.generate(seed=0)
    >>> rows = science_rows(world, n=2, rng=random.Random(1))
    >>> sorted(rows[0])
    ['answer', 'golden_response', 'id', 'prompt']
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from sdftlab.data.loaders import row_to_example
from sdftlab.data.templates import DEMO_TEMPLATE, teacher_messages

LETTERS = ("A", "B", "C", "D")

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ze",
    "tu",
    "vo",
    "ni",
    "sa",
    "pe",
    "do",
    "fi",
    "gu",
    "ba",
    "xe",
    "qui",
    "mor",
    "tal",
    "ven",
    "dor",
)
_SUFFIXES = ("ite", "ane", "ol", "ium", "ide", "ose")

SCIENCE_RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    # relation -> (question phrase, possible objects)
    "dissolves in": (
        "Which of the following does {s} dissolve in ?",
        ("water", "oil", "acid", "ether", "alcohol", "brine", "ammonia", "mercury"),
    ),
    "has the color": (
        "Which of the following is the color of {s} ?",
        ("red", "blue", "green", "yellow", "black", "white", "violet", "orange"),
    ),
    "is found in": (
        "Which of the following is {s} found in ?",
        ("rock", "sea", "soil", "clay", "ice", "sand", "ash", "salt"),
    ),
}

_CITIES = ("paris", "rome", "tokyo", "lima", "oslo", "cairo", "delhi", "quito", "seoul", "berlin")
_GENRES = ("jazz", "rock", "drama", "comedy", "horror", "poetry", "history", "travel")
_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")

# parameter -> (JSON type, instruction phrase, values)
TOOL_PARAMS: dict[str, tuple[str, str, tuple[str | int, ...]]] = {
    "city": ("string", "in {v}", _CITIES),
    "genre": ("string", "about {v}", _GENRES),
    "author": ("string", "by {v}", _NAMES),
    "year": ("integer", "from {v}", tuple(range(1990, 2026, 5))),
    "limit": ("integer", "top {v}", tuple(range(1, 10))),
}
_TOOL_DOMAINS = {
    # API name -> the noun its functions act on
    "Weather": "forecast",
    "Library": "books",
    "Cinema": "movies",
    "Kitchen": "recipes",
    "Flights": "flights",
    "Radio": "songs",
    "Museum": "paintings",
    "Garden": "plants",
}
# verb -> (function-name prefix, instruction template)
_TOOL_VERBS = {
    "get": ("get", "show me the {noun} {args}"),
    "search": ("search", "search for {noun} {args}"),
    "count": ("count", "how many {noun} are there {args}"),
}


def tool_name(verb: str, noun: str) -> str:
    """A tool function's name: the verb's prefix, then the noun (`countRecipes`)."""
    return _TOOL_VERBS[verb][0] + noun.capitalize()


# Every function name a world can draw.
TOOL_NAMES = tuple(tool_name(verb, noun) for noun in _TOOL_DOMAINS.values() for verb in _TOOL_VERBS)

_COUNTRIES = (
    "arvia",
    "belmor",
    "corsa",
    "dunland",
    "elbria",
    "fennic",
    "galdor",
    "hestia",
    "ilvan",
    "jorvik",
    "kalmar",
    "lorien",
    "mardia",
    "norvel",
    "ostra",
    "pelagia",
)
_CAPITALS = (
    "amber",
    "brisk",
    "coral",
    "delta",
    "ember",
    "flint",
    "grove",
    "haven",
    "iris",
    "jade",
    "knoll",
    "lumen",
    "marsh",
    "north",
    "opal",
    "pine",
)
_ANIMAL_SOUNDS = {
    "dog": "barks",
    "cat": "meows",
    "cow": "moos",
    "duck": "quacks",
    "lion": "roars",
    "horse": "neighs",
    "sheep": "bleats",
    "owl": "hoots",
    "frog": "croaks",
    "bee": "buzzes",
}
_OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "high": "low",
    "old": "new",
    "dark": "light",
    "hard": "soft",
    "wet": "dry",
    "early": "late",
    "full": "empty",
}
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
# Winogrande-format sentences: which animal a clause refers to follows from what the
# animals are like (big ones are hungry, strong, kind; small ones scared, weak, grateful), as
# the real benchmark's answers follow from common sense rather than from word order.
_WINO_BIG = ("the bear", "the wolf", "the horse", "the dog", "the fox", "the deer", "the goat")
_WINO_SMALL = ("the mouse", "the bird", "the hen", "the crow", "the owl", "the cat", "the pig")
_WINO_NOUNS = _WINO_BIG + _WINO_SMALL
# (verb, what follows "because _", which animal it fits: "big" or "small")
WINO_RULES = (
    ("chased", "was hungry", "big"),
    ("chased", "was scared", "small"),
    ("helped", "was kind", "big"),
    ("helped", "was weak", "small"),
    ("thanked", "was generous", "big"),
    ("thanked", "was grateful", "small"),
    ("beat", "was strong", "big"),
    ("beat", "was slow", "small"),
    ("called", "was far away", "big"),
    ("called", "was lonely", "small"),
    ("fed", "was caring", "big"),
    ("fed", "was starving", "small"),
)

_FILLER = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "with",
    "for",
    "on",
    "at",
    "by",
    "from",
    "this",
    "that",
    "very",
    "some",
    "all",
    "more",
    "new",
    "good",
    "first",
    "time",
    "day",
    "year",
    "way",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "point",
    "work",
    "number",
    "night",
    "home",
    "water",
    "room",
    "book",
    "eye",
    "word",
    "fact",
    "story",
    "light",
    "house",
    "tree",
    "road",
    "song",
    "game",
    "door",
)

SCIENCE_SYSTEM = (
    "Answer the question . Give the reasoning in <reasoning> and the letter in <answer> ."
)


def _compound_names(rng: random.Random, n: int, avoid: frozenset[str]) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        name = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_SUFFIXES)
        if name not in avoid:
            names.add(name)
    return sorted(names)


@dataclass(frozen=True)
class ToolFunction:
    api: str
    name: str
    verb: str
    noun: str
    params: tuple[str, ...]

    def signature(self) -> str:
        spec = {p: TOOL_PARAMS[p][0] for p in self.params}
        return f"{self.name}: Parameters: {json.dumps(spec)}"


@dataclass(frozen=True)
class WorldFacts:
    """Everything the generators sample from, fixed by one seed."""

    science: dict[tuple[str, str], str]  # (compound, relation) -> object
    compounds: tuple[str, ...]
    tools: dict[str, tuple[ToolFunction, ...]]  # api -> its functions
    capitals: dict[str, str]

    @staticmethod
    def generate(
        seed: int, n_compounds: int = 24, avoid: frozenset[str] = frozenset()
    ) -> WorldFacts:
        rng = random.Random(seed)
        compounds = tuple(_compound_names(rng, n_compounds, avoid))
        science = {
            (c, rel): rng.choice(objects)
            for c in compounds
            for rel, (_, objects) in SCIENCE_RELATIONS.items()
        }
        tools: dict[str, tuple[ToolFunction, ...]] = {}
        for api, noun in _TOOL_DOMAINS.items():
            verbs = rng.sample(sorted(_TOOL_VERBS), 2)
            funcs = []
            for verb in verbs:
                params = tuple(rng.sample(sorted(TOOL_PARAMS), rng.choice((1, 2))))
                funcs.append(ToolFunction(api, tool_name(verb, noun), verb, noun, params))
            tools[api] = tuple(funcs)
        capitals_pool = list(_CAPITALS)
        rng.shuffle(capitals_pool)
        capitals = dict(zip(_COUNTRIES, capitals_pool, strict=True))
        return WorldFacts(science, compounds, tools, capitals)


# ----------------------------------------------------------------------------- science


def science_example(world: WorldFacts, rng: random.Random) -> dict:
    compound = rng.choice(world.compounds)
    relation = rng.choice(sorted(SCIENCE_RELATIONS))
    question, objects = SCIENCE_RELATIONS[relation]
    truth = world.science[(compound, relation)]
    options = [truth, *rng.sample([o for o in objects if o != truth], 3)]
    rng.shuffle(options)
    letter = LETTERS[options.index(truth)]
    body = (
        question.format(s=compound)
        + "\n"
        + "\n".join(f"{ltr}: {opt}" for ltr, opt in zip(LETTERS, options, strict=True))
    )
    return {
        "prompt": [
            {"content": SCIENCE_SYSTEM, "role": "system"},
            {"content": body, "role": "user"},
        ],
        "answer": letter,
        # The reasoning states the fact, then checks the options in order up to the right one
        # (`B: rock yes`): the answer letter is then the one on the reasoning's last line.
        "golden_response": [
            "<reasoning>",
            f"{compound} {relation} {truth} .",
            *(
                f"{ltr}: {opt} {'yes' if opt == truth else 'no'}"
                for ltr, opt in zip(LETTERS, options[: options.index(truth) + 1], strict=False)
            ),
            "</reasoning>",
            "<answer>",
            letter,
            "</answer>",
        ],
    }


def science_rows(world: WorldFacts, n: int, rng: random.Random) -> list[dict]:
    return [{"id": f"science-{i}", **science_example(world, rng)} for i in range(n)]


# ----------------------------------------------------------------------------- tool use


def _tool_call(fn: ToolFunction, rng: random.Random) -> tuple[str, dict]:
    values = {p: rng.choice(TOOL_PARAMS[p][2]) for p in fn.params}
    args = " ".join(TOOL_PARAMS[p][1].format(v=values[p]) for p in fn.params)
    phrase = _TOOL_VERBS[fn.verb][1].format(noun=fn.noun, args=args)
    return phrase, values


def tooluse_example(world: WorldFacts, rng: random.Random) -> dict:
    api = rng.choice(sorted(world.tools))
    funcs = world.tools[api]
    calls = [rng.choice(funcs)]
    if rng.random() < 0.3:  # ToolAlpaca has several calls in about a third of its rows
        calls.append(rng.choice(funcs))
    phrases, inputs = zip(*(_tool_call(fn, rng) for fn in calls), strict=True)
    instruction = " and then ".join(phrases) + " ."
    documentation = "\n".join(fn.signature() for fn in funcs)
    prompt = f"Tools:\nName: {api}\n{documentation}\nQuestion: {instruction}"
    golden = [
        {"Action": fn.name, "Action_Input": json.dumps(inp)}
        for fn, inp in zip(calls, inputs, strict=True)
    ]
    response = []
    for call in golden:
        response += [f"Action: {call['Action']}", f"Action Input: {call['Action_Input']}"]
    return {
        "prompt": prompt,
        "name": api,
        "description": f"{api} tools",
        "nl_documentation": documentation,
        "instruction": instruction,
        "golden_answer": golden,
        "golden_response": response,
    }


def tooluse_rows(world: WorldFacts, n: int, rng: random.Random) -> list[dict]:
    return [{"id": f"tooluse-{i}", **tooluse_example(world, rng)} for i in range(n)]


# ----------------------------------------------------------------------------- general knowledge


# kind → (subject, the statement, the question): facts looked up in a table of the world
_LOOKUP_FACTS = {
    "capital": ("geography", "the capital of {x} is {y} .", "What is the capital of {x} ?"),
    "animal": ("biology", "the {x} {y} .", "What sound does the {x} make ?"),
    "opposite": ("language", "the opposite of {x} is {y} .", "What is the opposite of {x} ?"),
}


def _knowledge_item(world: WorldFacts, rng: random.Random) -> tuple[str, str, str, list[str]]:
    """(subject, statement, question, [truth, distractor, distractor, distractor])."""
    kind = rng.choice(("capital", "animal", "opposite", "arithmetic"))
    if kind in _LOOKUP_FACTS:
        table = {"capital": world.capitals, "animal": _ANIMAL_SOUNDS, "opposite": _OPPOSITES}[kind]
        subject, statement, question = _LOOKUP_FACTS[kind]
        key = rng.choice(sorted(table))
        truth = table[key]
        pool = [v for v in table.values() if v != truth]
        return (
            subject,
            statement.format(x=key, y=truth),
            question.format(x=key),
            [truth, *rng.sample(pool, 3)],
        )
    a, b = rng.randrange(0, 6), rng.randrange(0, 5)
    truth = _NUMBER_WORDS[a + b]
    pool = [w for w in _NUMBER_WORDS if w != truth]
    return (
        "arithmetic",
        f"{_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} is {truth} .",
        f"What is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} ?",
        [truth, *rng.sample(pool, 3)],
    )


def mmlu_example(world: WorldFacts, rng: random.Random) -> dict:
    subject, _, question, options = _knowledge_item(world, rng)
    truth = options[0]
    rng.shuffle(options)
    return {
        "question": question,
        "subject": subject,
        "choices": options,
        "answer": options.index(truth),
    }


def mmlu_rows(world: WorldFacts, n: int, rng: random.Random) -> list[dict]:
    return [mmlu_example(world, rng) for _ in range(n)]


def mmlu_text(row: dict) -> str:
    """A row in lm-eval's MMLU prompt format, with its answer (for pretraining)."""
    lines = [row["question"]] + [
        f"{ltr}. {c}" for ltr, c in zip(LETTERS, row["choices"], strict=True)
    ]
    return "\n".join(lines) + f"\nAnswer: {LETTERS[row['answer']]}"


def winogrande_example(rng: random.Random) -> dict:
    """One big and one small animal in either order; the clause fits one of them."""
    verb, tail, fits = rng.choice(WINO_RULES)
    big, small = rng.choice(_WINO_BIG), rng.choice(_WINO_SMALL)
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    sentence = f"{first.capitalize()} {verb} {second} because _ {tail} ."
    who = 1 if (first == big) == (fits == "big") else 2
    return {"sentence": sentence, "option1": first, "option2": second, "answer": str(who)}


def winogrande_rows(n: int, rng: random.Random) -> list[dict]:
    return [winogrande_example(rng) for _ in range(n)]


def winogrande_text(row: dict) -> str:
    """The sentence with the right option in place of `_` (for pretraining)."""
    option = row["option1"] if row["answer"] == "1" else row["option2"]
    return row["sentence"].replace("_", option)


# ----------------------------------------------------------------------------- pretraining


# Every general word of the world (no science compound): the copy curriculum's vocabulary.
# A wide vocabulary keeps spans unambiguous, which is what lets induction heads form early.
# Tool function names and tool-argument numbers are in it too: they are single, rare tokens
# that only tool-use text would otherwise train, and a teacher must copy them from a
# tool-use demonstration (without them, `base` copied the JSON but not the function name).
COPY_WORDS = tuple(
    sorted(
        set(_FILLER + _CITIES + _GENRES + _NAMES + _COUNTRIES + _CAPITALS + _NUMBER_WORDS)
        | set(_ANIMAL_SOUNDS)
        | set(_ANIMAL_SOUNDS.values())
        | set(_OPPOSITES)
        | set(_OPPOSITES.values())
        | {w for noun in _WINO_NOUNS for w in noun.split()}
        | set(TOOL_NAMES)
        | {str(v) for _, _, values in TOOL_PARAMS.values() for v in values if isinstance(v, int)}
    )
)


# The common words: the tokenizer's corpus uses only these in its copy spans, so the rarer
# names (countries, people, capitals) stay split into several tokens, as rare words are in
# real text. That within-word structure is what lets induction heads form early (with every
# word a single token, copying did not emerge: docs/LOG.md, "growing in-context copying").
COMMON_WORDS = _FILLER + _CITIES + _GENRES


def copy_document(rng: random.Random, words: tuple[str, ...] = COPY_WORDS, max_gap: int = 0) -> str:
    """A span of 5–20 random words, repeated 2–4 times: the curriculum that grows induction heads.

    Every repetition after the first is predictable only by looking back at the earlier one,
    so each document carries several copies' worth of signal for in-context copying. With
    `max_gap`, up to that many unrelated words separate the repetitions, so copying is also
    learnt across the distance between a demonstration and the answer in a teacher prompt.
    """
    span = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
    parts = [span]
    for _ in range(rng.randint(1, 3)):
        gap = " ".join(rng.choice(words) for _ in range(rng.randint(0, max_gap)))
        parts += [f"{gap} ::" if gap else "", span] if max_gap else [span]
    return " | ".join(p for p in parts if p)


def copy_accuracy_probe(rng: random.Random, n: int = 32) -> list[tuple[str, str]]:
    """(first half, full text) pairs: how well a model predicts the repeated half."""
    out = []
    for _ in range(n):
        span = " ".join(rng.choice(COPY_WORDS) for _ in range(12))
        out.append((f"{span} |", f"{span} | {span}"))
    return out


def _words(rng: random.Random, lo: int, hi: int, pool: tuple[str, ...] = COPY_WORDS) -> list[str]:
    return [rng.choice(pool) for _ in range(rng.randint(lo, hi))]


def _random_block(
    rng: random.Random, lines: tuple[int, int], pool: tuple[str, ...] = COPY_WORDS
) -> str:
    """Novel multi-line text in one shape: sentences, key/value, JSON, tags or options."""
    n = rng.randint(*lines)
    shape = rng.randrange(5)
    if shape == 0:
        return "\n".join(" ".join(_words(rng, 3, 8, pool)) + " ." for _ in range(n))
    if shape == 1:
        return "\n".join(
            f"{rng.choice(pool)}: {' '.join(_words(rng, 1, 3, pool))}" for _ in range(n)
        )
    if shape == 2:
        body = {rng.choice(pool): rng.choice((*pool, *range(1, 10))) for _ in range(n)}
        head = rng.choice(pool)
        return f"{head.capitalize()}: {rng.choice(pool)}\nInput: {json.dumps(body)}"
    if shape == 3:
        tag = rng.choice(pool)
        body = " ".join(_words(rng, 3, 10, pool))
        return f"<{tag}>\n{body}\n</{tag}>\n<{tag}s>\n{rng.choice(LETTERS)}\n</{tag}s>"
    return "\n".join(f"{ltr}: {' '.join(_words(rng, 1, 2, pool))}" for ltr in LETTERS[: max(2, n)])


def lookup_document(rng: random.Random) -> str:
    """Four lettered options, then several `<reasoning>` lines naming one option each and the
    `<answer>` letter that goes with it (and the same in MMLU's `A.` / `Answer:` style).

    Multiple-choice answers need one skill the copy spans do not teach: find the option that
    matches a word and emit the letter *before* it. Science answers and MMLU-format letters
    both rest on it.
    """
    words = rng.sample(COPY_WORDS, 4)
    mmlu_style = rng.random() < 0.5
    sep = ". " if mmlu_style else ": "
    lines = [f"{ltr}{sep}{w}" for ltr, w in zip(LETTERS, words, strict=True)]
    for _ in range(rng.randint(2, 4)):
        i = rng.randrange(4)
        subject = " ".join(_words(rng, 1, 3))
        if mmlu_style:
            lines.append(f"{subject} is {words[i]} .\nAnswer: {LETTERS[i]}")
        else:
            reasoning = f"<reasoning>\n{subject} {words[i]} .\n</reasoning>"
            lines.append(f"{reasoning}\n<answer>\n{LETTERS[i]}\n</answer>")
    return "\n".join(lines)


def structured_copy_document(rng: random.Random) -> str:
    """A multi-line block over a handful of words (options, tags, JSON, key/value), twice.

    Plain copy spans have a unique word at every position, so one token of context finds the
    place to copy from. Real demonstrations do not: after `<answer>` and a newline comes the
    letter, but a newline precedes every option letter in the prompt too. Copying such text
    needs a match on more than the last token, which these documents teach.
    """
    pool = tuple(rng.sample(COPY_WORDS, rng.randint(3, 8)))
    block = "\n".join(_random_block(rng, (2, 4), pool) for _ in range(rng.randint(1, 2)))
    return f"{block}\n\n{block}"


def demo_chat(rng: random.Random, world: WorldFacts) -> tuple[str, str]:
    """(user message, assistant response) with the response shown as a demonstration.

    Most of the time the prompt and the response are novel multi-line text of task-like
    shapes and lengths (options, JSON, tags, key/value lines), so only the demonstration can
    supply the answer; sometimes the answer is a general-knowledge statement. Lengths are
    those of real teacher prompts (≈ 100–250 tokens): copying must work far into the context.
    """
    if rng.random() < 0.8:
        question = " ".join(_words(rng, 4, 10)) + " ?\n" + _random_block(rng, (2, 6))
        response = _random_block(rng, (2, 6))
    else:
        _, statement, question, _ = _knowledge_item(world, rng)
        response = statement
    return DEMO_TEMPLATE.format(prompt=question, demonstration=response), response


def task_demo_chat(rng: random.Random, shadows: tuple[WorldFacts, ...]) -> list[dict[str, str]]:
    """A science or tool-use prompt of a *shadow* world, in the exact SDFT teacher format.

    The shadow worlds share the real world's names and tools but not its facts, so the only
    way to answer is to use the demonstration in context: this is what teaches the base model
    to be a teacher (the paper's Qwen2.5-Instruct already is one). The messages are those the
    teacher sees in SDFT (system prompt, `DEMO_TEMPLATE`), the assistant turn the demonstration.
    """
    shadow = rng.choice(shadows)
    task = "science" if rng.random() < 0.5 else "tooluse"
    row = science_example(shadow, rng) if task == "science" else tooluse_example(shadow, rng)
    example = row_to_example("shadow world", task, 0, row)
    return [
        *teacher_messages(example),
        {"role": "assistant", "content": example.demonstration},
    ]


def shadow_worlds(seed: int, n: int, real: WorldFacts) -> tuple[WorldFacts, ...]:
    """`n` worlds with the real world's tools and relations, independent facts, and compound
    names the real world does not use (so no real science fact leaks into pretraining)."""
    rng = random.Random(seed)
    avoid = frozenset(real.compounds)
    size = len(real.compounds)
    return tuple(WorldFacts.generate(rng.randrange(2**31), size, avoid) for _ in range(n))


def general_chat(rng: random.Random, world: WorldFacts) -> tuple[str, str]:
    """(user, assistant) general-knowledge Q&A without a demonstration."""
    _, statement, question, _ = _knowledge_item(world, rng)
    return question, statement


def knowledge_statement(rng: random.Random, world: WorldFacts) -> str:
    return _knowledge_item(world, rng)[1]
