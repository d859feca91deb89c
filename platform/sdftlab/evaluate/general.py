"""General capability with lm-evaluation-harness: MMLU and Winogrande over local files.

The harness scores exactly as the field does: its `HFLM` wraps the model already in memory,
and the task files here *include* lm-eval's own `mmlu` and `winogrande` task definitions
(prompt format, choices, Winogrande's partial scoring) and only swap the dataset for a local
JSON/JSONL/parquet file with the same columns — so the tiny world's files and real
`cais/mmlu` / `allenai/winogrande` exports drop in alike.

    >>> general_capability(model, tokenizer, {"mmlu": "mmlu_eval.jsonl"})
    {'mmlu/acc': 0.71}
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sdftlab.errors import DataError

GENERAL_TASKS = ("mmlu", "winogrande")
# The lm-eval task each of ours includes (paths inside the installed lm_eval package).
_UPSTREAM = {
    "mmlu": ("mmlu", "default", "_default_template_yaml"),
    "winogrande": ("winogrande", "default.yaml"),
}
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_REQUIRED = {
    "mmlu": ("question", "choices", "answer"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
}


def _upstream_yaml(task: str) -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / Path(*_UPSTREAM[task])
    if not path.is_file():
        raise RuntimeError(f"lm-eval {lm_eval.__version__} has no {path}; reinstall lm-eval 0.4.x")
    return path


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


def write_task_yamls(files: Mapping[str, str | Path], directory: Path) -> list[str]:
    """Write one lm-eval task YAML per general task into `directory`; return the task names."""
    names = []
    for task, file in files.items():
        path = Path(file).resolve()
        builder = _check_file(task, path)
        spec: dict[str, Any] = {
            "include": str(_upstream_yaml(task)),
            "task": f"sdftlab_{task}",
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
        (directory / f"sdftlab_{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(f"sdftlab_{task}")
    return names


def general_capability(
    model: Any,
    tokenizer: Any,
    files: Mapping[str, str | Path],
    *,
    batch_size: int = 32,
    limit: int | None = None,
) -> dict[str, float]:
    """Accuracy (`<task>/acc`) of an in-memory model on each general task file, via lm-eval,
    and the number of rows it scored (`<task>/n`)."""
    if not files:
        return {}
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sdftlab-lmeval-") as tmp:
        names = write_task_yamls(files, Path(tmp))
        # Our YAMLs include lm-eval's task files by path, so its index of every built-in task
        # (5-8 s to build, once per call) is not needed (benchmarks/lmeval_tasks.py).
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluator.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    metrics: dict[str, float] = {}
    for name in names:
        result = out["results"][name]
        task = name.removeprefix("sdftlab_")
        metrics[f"{task}/acc"] = float(result["acc,none"])
        metrics[f"{task}/n"] = float(out["n-samples"][name]["effective"])
    return metrics
