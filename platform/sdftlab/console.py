"""What a person reads: sdftlab's own lines on the terminal, the libraries' in a log file.

A command that runs stages (`demo`, `run`, `degrade`, `recover`, `sweep`, `eval`, `cka`,
`world build`, `python jobs/*.py`) is quiet unless `--verbose` is given:

- `quiet(path)` points the process's file descriptors 1 and 2 at the log file `path`, so that
  whatever a library writes there — Ray's and vLLM's notices, warnings, progress bars, the
  lines of C++ cores and of the processes the command starts — lands in the file; the
  terminal keeps a descriptor of its own, and `sys.stdout` writes to it: sdftlab's `print`s
  are what the console shows. `sys.stderr` is the file (Python's warnings, `logging`'s
  last-resort handler, tqdm); sdftlab's own warnings and errors go to the terminal through
  `warn` and `error`. vLLM's logger, which writes to stdout, is sent to stderr
  (`VLLM_LOGGING_STREAM`, read where vLLM is imported: here and in the local workers).
- Ray forwards every worker's output to the driver, each line prefixed with its process
  (`(RayTrainWorker pid=…)`). `route_worker_lines()`, called once Ray is up, replaces Ray's
  printer with one that sends a worker's sdftlab lines (`[sft] …`, `[sdft] …`) to the terminal
  without the prefix and every other line, prefixed, to the log file.

The log file is `<home>/logs/<UTC time>-<command>.log`; its path is the first line a quiet
command prints. `--verbose` leaves every library's output where it prints it, and so does a
caller that has replaced `sys.stdout` itself (a notebook, a test's capture): `session` is quiet
only for a process whose stdout is its own, and gives the descriptors back when it ends.

    >>> with session(home, "demo", verbose=False):
    ...     run_pipeline(cfg, lineage, home)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

OWN_WORKER_LINE = re.compile(r"^\[(sft|sdft|world|cka|eval)\] ")

_terminal: dict[str, IO[str]] = {}
_log: list[IO[str]] = []
_routed: list[tuple[str, Any]] = []  # Ray's printer, while replaced


def log_path(home: Path, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return home / "logs" / f"{stamp}-{command.replace(' ', '-')}.log"


@contextlib.contextmanager
def session(home: Path, command: str, verbose: bool) -> Iterator[Path | None]:
    """Quiet for the duration of a command (its log file's path), or as is (None)."""
    if verbose or _terminal or sys.stdout is not sys.__stdout__:
        yield None
        return
    path = log_path(home, command)
    quiet(path)
    try:
        yield path
    finally:
        _restore()


def quiet(path: Path) -> None:
    """From now on the libraries' output goes to `path` and sdftlab's to the terminal."""
    if _terminal:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 — the process's log
    sys.stdout.flush()
    sys.stderr.flush()
    _terminal["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    _terminal["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _log.append(log)
    sys.stdout = _terminal["out"]
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    print(f"log: {path} (the libraries' output; --verbose shows it here)")


def _restore() -> None:
    """The process's descriptors and Ray's printer as they were before `quiet`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(_terminal["out"].fileno(), 1)
    os.dup2(_terminal["err"].fileno(), 2)
    sys.stdout = sys.__stdout__
    if _routed:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("sdftlab_console")
        dispatcher.add_handler(*_routed.pop())  # Ray's own printer, as it was
    for stream in (*_terminal.values(), *_log):
        stream.close()
    _terminal.clear()
    _log.clear()


def warn(message: str) -> None:
    print(f"sdftlab: warning: {message}", file=_terminal.get("err", sys.stderr), flush=True)


def error(message: str) -> None:
    print(f"sdftlab: error: {message}", file=_terminal.get("err", sys.stderr), flush=True)


def route_worker_lines() -> None:
    """Sort the worker lines Ray forwards to this driver: sdftlab's to the terminal without
    Ray's prefix, the rest to the log file. No-op unless `quiet` is on."""
    if not _terminal:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if _routed:
        return
    _routed.extend(pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs")
    if not _routed:  # Ray forwards no worker lines to this driver (log_to_driver=False)
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("sdftlab_console", _route)


def _route(data: dict[str, Any]) -> None:
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in data.get("lines", []):
        if not data.get("is_err") and OWN_WORKER_LINE.match(line):
            _terminal["out"].write(line + "\n")
        else:
            _log[0].write(f"({who} pid={data.get('pid')}) {line}\n")
