"""General capability with lm-evaluation-harness: MMLU and Winogrande over local files.

The harness scores exactly as the field does: its `HFLM` wraps the model already in memory,
and the task files here *include* lm-eval's own `mmlu` and `winogrande` task definitions
(prompt format, choices, Winogrande's partial scoring) and only swap the dataset for a local
JSON/JSONL/parquet file with the same columns — so the tiny world's files and real
`cais/mmlu` / `allenai/winogrande` exports drop in alike.

MMLU is scored in both of lm-eval's formulations over the same file: `mmlu/acc`, the letter
after `Answer:` (its `mmlu` task, the multiple-choice formulation the paper's tables use),
and `mmlu/acc_cloze`, each option's own text after `Question: …\nAnswer:` (its
`mmlu_continuation` task, the cloze formulation). Small models answer the letter form at
chance while they already know part of the content — pointing at the option that holds a
fact is a skill of its own — so evaluations of small models (OLMES, SmolLM) read the cloze
form; the tiny world's `base` scores 26% on the letter form and 41% on the cloze form
(chance 25%).

`english` is held-out English for a real model, whose general capability the tiny world's
synthetic MMLU- and Winogrande-format facts do not measure: the prose paragraphs of the
Python documentation topics that ship with CPython (`pydoc_data.topics`, 64 passages of
about 1,000 characters), scored by lm-eval's rolling log-likelihood as its `wikitext` task
scores Wikipedia: `english/bpb`, bits per byte (lower is better; tokenizer-independent).
Forgetting general language shows as a rise against the model the lineage started from.

    >>> general_capability(model, tokenizer, {"mmlu": "mmlu_eval.jsonl"})
    {'mmlu/acc': 0.26, 'mmlu/n': 300.0, 'mmlu/acc_cloze': 0.41}
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sdftlab.errors import DataError

GENERAL_TASKS = ("mmlu", "winogrande", "english")
# Each task's formulations: the metric each records and the lm-eval task file it includes
# (a path inside the installed lm_eval package).
FORMULATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "mmlu": {
        "acc": ("mmlu", "default", "_default_template_yaml"),
        "acc_cloze": ("mmlu", "continuation", "_continuation_template_yaml"),
    },
    "winogrande": {"acc": ("winogrande", "default.yaml")},
    "english": {"bpb": ()},  # our own rolling log-likelihood task (`_english_spec`)
}
LOWER_IS_BETTER = ("/bpb",)
GENERAL_METRICS = tuple(f"{t}/{m}" for t, forms in FORMULATIONS.items() for m in forms)
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_REQUIRED = {
    "mmlu": ("question", "choices", "answer"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "english": ("text",),
}
ENGLISH_PASSAGES = 64


def _upstream_yaml(task: str, metric: str) -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / Path(*FORMULATIONS[task][metric])
    if not path.is_file():
        raise RuntimeError(f"lm-eval {lm_eval.__version__} has no {path}; reinstall lm-eval 0.4.x")
    return path


def english_passages(n: int = ENGLISH_PASSAGES, size: int = 1000) -> list[str]:
    """`n` passages of about `size` characters of prose from CPython's documentation topics
    (paragraphs that are not indented code or headings), spread over the topics, in order."""
    from pydoc_data.topics import topics

    passages: list[str] = []
    for key in sorted(topics):
        current = ""
        for block in topics[key].split("\n\n"):
            lines = block.splitlines()
            if (
                not lines
                or block.startswith(" ")
                or len(block) < 200
                or set(lines[-1]) <= {"*", "-", "="}
            ):
                continue
            current = f"{current} {' '.join(x.strip() for x in lines)}".strip()
            if len(current) >= size:
                passages.append(current)
                current = ""
    step = max(1, len(passages) // n)
    return passages[::step][:n]


def english_text_file(directory: Path) -> Path:
    """The `english` task's JSONL (`text` per row) under `directory`, written once, atomically."""
    import json

    from sdftlab.paths import atomic_write

    path = directory / "english_eval.jsonl"
    if not path.is_file():
        with atomic_write(path) as fh:
            fh.write("".join(json.dumps({"text": t}) + "\n" for t in english_passages()))
    return path


def _english_spec(name: str, path: Path, builder: str) -> dict[str, Any]:
    """A rolling log-likelihood task over `text` rows (as lm-eval's `wikitext`)."""
    return {
        "task": name,
        "dataset_path": builder,
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [  # as lm-eval's wikitext task declares them
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
            )
        ],
    }


def _check_file(task: str, path: Path) -> str:
    if task not in GENERAL_TASKS:
        raise DataError(f"unknown general task {task!r}; known: {', '.join(GENERAL_TASKS)}")
    if not path.is_file():
        raise DataError(f"{task}: data file {path} does not exist")
    builder = _FORMATS.get(path.suffix)
    if builder is None:
        raise DataError(
            f"{task}: {path} has suffix {path.suffix!r}; use one of {', '.join(_FORMATS)}"
        )
    if builder == "json":
        import json

        with path.open() as fh:
            first = fh.readline()
        try:
            row = json.loads(first) if path.suffix == ".jsonl" else None
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line 1: not valid JSON ({err.msg})") from None
        if row is not None:
            missing = [f for f in _REQUIRED[task] if f not in row]
            if missing:
                raise DataError(
                    f"{path} line 1: missing field(s) {missing} "
                    f"({task} rows need {', '.join(_REQUIRED[task])})"
                )
    return builder


def write_task_yamls(files: Mapping[str, str | Path], directory: Path) -> dict[str, str]:
    """Write one lm-eval task YAML per general task and formulation into `directory`; return
    {lm-eval task name: the metric it records (`mmlu/acc`, `mmlu/acc_cloze`, …)}."""
    names = {}
    for task, file in files.items():
        path = Path(file).resolve()
        builder = _check_file(task, path)
        for metric in FORMULATIONS[task]:
            name = f"sdftlab_{task}{metric.removeprefix('acc')}"  # sdftlab_mmlu, …_mmlu_cloze
            if task == "english":
                name = "sdftlab_english"
                spec = _english_spec(name, path, builder)
                (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
                names[name] = f"{task}/{metric}"
                continue
            spec = {
                "include": str(_upstream_yaml(task, metric)),
                "task": name,
                "dataset_path": builder,
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test",
                "validation_split": None,
                "training_split": None,
                "fewshot_split": None,
            }
            if task == "mmlu":
                spec["fewshot_config"] = None
            (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            names[name] = f"{task}/{metric}"
    return names


def general_capability(
    model: Any,
    tokenizer: Any,
    files: Mapping[str, str | Path],
    *,
    batch_size: int = 32,
    limit: int | None = None,
) -> dict[str, float]:
    """Accuracy of an in-memory model on each general task file, via lm-eval, in each of the
    task's formulations (`mmlu/acc`, `mmlu/acc_cloze`, `winogrande/acc`), and the number of
    rows it scored (`<task>/n`)."""
    if not files:
        return {}
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # its per-call notices and progress bars: not for
        logging.getLogger(name).setLevel(logging.ERROR)  # a person reading a pipeline's run
    with (
        tempfile.TemporaryDirectory(prefix="sdftlab-lmeval-") as tmp,
        contextlib.redirect_stderr(io.StringIO()),
    ):
        names = write_task_yamls(files, Path(tmp))
        # Our YAMLs include lm-eval's task files by path, so its index of every built-in task
        # (seconds to build, once per call) is not needed (docs/BENCHMARKS.md).
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluator.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    metrics: dict[str, float] = {}
    for name, metric in names.items():
        key = "bits_per_byte,none" if metric.endswith("/bpb") else "acc,none"
        metrics[metric] = float(out["results"][name][key])
        metrics[f"{metric.split('/')[0]}/n"] = float(out["n-samples"][name]["effective"])
    return metrics
