"""A quiet command's console holds sdftlab's lines only: the libraries' output — C-level writes,
warnings, logging, Ray workers' lines — lands in the log file it names, and `--verbose` (or a
caller that has replaced stdout) leaves every stream as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time, warnings
    from pathlib import Path
    from sdftlab import console

    verbose = sys.argv[2] == "verbose"
    with console.session(Path(sys.argv[1]), "demo", verbose=verbose) as log:
        os.write(1, b"a C-level line\\n")
        warnings.warn("a library's warning")
        logging.getLogger("somelib").warning("a library's log record")
        print("== an sdftlab line")
        console.warn("an sdftlab warning")
        if verbose:  # Ray's own printing is Ray's: nothing of sdftlab's to see there
            sys.exit(0)

        import ray
        from sdftlab.raycluster import ensure_ray

        ensure_ray(num_cpus=1)

        @ray.remote
        def worker():
            print("[sft] step    1/2  loss 1.0000", flush=True)
            print("INFO a library's line in a worker", flush=True)
            print("a worker's stderr line", file=sys.stderr, flush=True)

        ray.get(worker.remote())
        deadline = time.time() + 30
        while log and "library's line in a worker" not in log.read_text():
            assert time.time() < deadline, "Ray forwarded no worker line in 30 s"
            time.sleep(0.5)
        ray.shutdown()
    print("== after the session")
    """
)


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "quiet_command.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "home"), mode],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip


def test_a_quiet_command_prints_only_its_own_lines_and_logs_the_rest(tmp_path):
    run = _run(tmp_path, "quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("log: ") and "--verbose" in lines[0]
    log = Path(lines[0].split()[1])
    assert log.parent == tmp_path / "home" / "logs" and log.name.endswith("-demo.log")
    # The worker's sdftlab line, without Ray's "(worker pid=…)" prefix; nothing else.
    assert lines[1:] == [
        "== an sdftlab line",
        "[sft] step    1/2  loss 1.0000",
        "== after the session",
    ], run.stdout
    assert run.stderr.splitlines() == ["sdftlab: warning: an sdftlab warning"], run.stderr
    text = log.read_text()
    for line in ("a C-level line", "a library's warning", "a library's log record"):
        assert line in text
    assert "pid=" in next(x for x in text.splitlines() if "library's line in a worker" in x)
    assert "a worker's stderr line" in text
    assert "[sft] step" not in text


def test_verbose_leaves_every_stream_as_the_libraries_print_it(tmp_path):
    run = _run(tmp_path, "verbose")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (tmp_path / "home" / "logs").exists()
    assert run.stdout.splitlines() == ["a C-level line", "== an sdftlab line"], run.stdout
    assert "a library's warning" in run.stderr and "a library's log record" in run.stderr
    assert "sdftlab: warning: an sdftlab warning" in run.stderr


def test_a_caller_that_captures_stdout_keeps_it(tmp_path, capsys):
    from sdftlab import console

    with console.session(tmp_path, "demo", verbose=False) as log:
        print("captured")
    assert log is None and capsys.readouterr().out == "captured\n"
    assert not (tmp_path / "logs").exists()
