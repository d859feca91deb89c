"""`ray job submit` as docs/CLUSTER.md documents it, against a real two-node Ray cluster started
by the test on this machine (`ray start --head` with no CPUs, as the cluster's head, and a
worker node that runs the work), with Ray's token authentication on: the submitted copy's code
runs, and the states and the report land on the storage both nodes share."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sdftlab.lineage import Lineage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A two-node Ray cluster with RAY_AUTH_MODE=token, shaped as `cluster.yaml`'s: a head that
    runs no work (0 CPUs: the job's driver only) and a worker node that runs every task and
    actor; yields (dashboard address, client env holding the token). Stopped by signalling
    the nodes' sessions: other Ray clusters on the machine are left alone."""
    import ray

    ray.shutdown()  # this test process must not hold a local Ray of its own
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in a job: this venv's
    )
    dashboard, port = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"sdftlab-ray-{secrets.token_hex(3)}"  # short: socket paths

    def node(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    head = node("--head", f"--port={port}", "--dashboard-host=127.0.0.1", "--num-cpus=0",
                f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}")  # fmt: skip
    nodes = [head]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}")
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            time.sleep(3)
        else:
            pytest.fail("the Ray head's job server did not come up in 240 s")
        nodes.append(node(f"--address=127.0.0.1:{port}", "--num-cpus=2"))
        yield address, env
    finally:
        for process in reversed(nodes):
            os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            _kill_session(process.pid)  # Ray's workers sit in their own process groups
            process.wait()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (the head was started in a new session)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def _ray(
    env: dict[str, str], *args: str, timeout: int = 120, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_a_pipeline_job_submitted_with_the_token_runs_and_reports(ray_head, small_world, tmp_path):
    address, env = ray_head
    world, lineage, home = small_world
    # The job's own lineage, seeded with the small world's `base` (no pretraining in the job).
    job_lineage = Lineage(tmp_path / "lineage")
    base = lineage.meta("base")
    job_lineage.save_dir(
        "base", lineage.local_path("base"), kind="world", config=base.config, metrics=base.metrics
    )
    config = {
        "name": "submitted",
        "lineage": str(job_lineage.root),
        "stages": {
            "base": {"kind": "world", **world.config.model_dump(mode="json")},
            "expert": {
                "kind": "sft",
                "from": "base",
                "data": ["science"],
                "steps": 2,
                "batch_size": 8,
                "checkpoint_every": 2,
            },
        },
        "eval": {"tasks": ["science"], "limit": 4},
        "cka": {"reference": "base", "limit": 4, "actors": None},  # in the job's driver
        "report": {"dir": str(tmp_path / "report")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    job_id = f"sdftlab-test-{secrets.token_hex(4)}"
    # Submitted as docs/CLUSTER.md says, from a copy of the project (a user's edited checkout):
    # `py_modules` ships its sdftlab to the driver and every worker, ahead of the copy the
    # environment was installed from (this checkout, through the editable install).
    submitted = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, tracked):
        (submitted / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, submitted / name)
    runtime_env = json.dumps(
        {"py_modules": ["platform/sdftlab"], "env_vars": {"SDFTLAB_HOME": str(home)}}
    )

    submit = _ray(
        env, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--working-dir", ".", "--runtime-env-json", runtime_env,
        "--", "python", "jobs/forgetting.py", "--config", str(path), cwd=submitted,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr

    deadline = time.time() + 1200
    status = ""
    while time.time() < deadline:
        polled = _ray(env, "job", "status", "--address", address, job_id)
        status = (polled.stdout + polled.stderr).lower()
        if any(f"job '{job_id}' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = _ray(env, "job", "logs", "--address", address, job_id).stdout
    assert f"job '{job_id}' succeeded" in status, status + logs[-4000:]
    assert "── stage 2/2 SFT base on science: expert" in logs
    # The job's console is sdftlab's own: stage headers, unprefixed progress lines, results;
    # Ray's, vLLM's and the other libraries' lines are in the log file its first line names.
    # (Before the job's process writes, `ray job logs` and Ray's job manager write their own
    # lines: the client's address, "Runtime env is setting up", the entrypoint.)
    lines = [line for line in logs.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("log: "))
    assert "Running entrypoint for job" in lines[start - 1], logs
    lines = lines[start:]
    own = re.compile(r"^(log: |run |tracking: |report: |── |   |\[(sft|sdft)\] step )")
    assert not [line for line in lines if not own.match(line)], logs
    assert any(line.startswith("[sft] step    2/2") for line in lines), logs
    log_file = Path(lines[0].split()[1])
    assert log_file.parent == home / "logs" and "pid=" in log_file.read_text()
    run_dir = (tmp_path / "report" / "latest").resolve()  # the run's own folder, never reused
    assert run_dir.parent == tmp_path / "report"
    assert f"report: {run_dir / 'report.md'}" in logs

    report = (run_dir / "report.md").read_text()
    assert "expert" in report
    results = pd.read_parquet(run_dir / "results.parquet")
    assert {"base", "expert"} <= set(results["state"])
    assert job_lineage.meta("expert").parents == ["base"]
    # the code that ran is the submitted copy's, unpacked by Ray, not this checkout's
    code = Path(job_lineage.meta("expert").provenance["code"])
    assert code.name == "sdftlab" and not code.is_relative_to(REPO), code
    assert (code / "lineage.py").read_bytes() == (REPO / "platform/sdftlab/lineage.py").read_bytes()
    assert env["RAY_AUTH_TOKEN"] not in logs + report  # the token never lands in logs/reports
