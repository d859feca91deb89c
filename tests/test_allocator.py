"""The CPU allocator setting: with `heap` a process reuses freed tensor memory instead of
page-faulting it in anew; `system` keeps the C library's behaviour; a bad value is one error."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")

# Allocate and free a 40 MiB tensor 30 times, in the main thread and in another one (Ray Train
# runs its loop in a thread of its own); minor page faults of the last 10 rounds, once glibc's
# bins have settled (the heap setting faults in the first few rounds too).
CHILD = """
import json, resource, threading
import torch
from sdftlab.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator()
def faults_of_reuse():
    for _ in range(20):
        x = torch.ones(10 << 20); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.ones(10 << 20); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
out = {"tuned": tuned, "main": faults_of_reuse()}
thread = threading.Thread(target=lambda: out.update(thread=faults_of_reuse()))
thread.start(); thread.join()
print(json.dumps(out))
"""


def _run(setting: str) -> dict:
    env = {**os.environ, "SDFTLAB_CPU_ALLOC": setting, "PYTHONPATH": PLATFORM}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting tunes glibc's malloc; elsewhere it is a no-op by design",
)
def test_heap_setting_reuses_freed_memory_in_the_main_thread_and_others():
    system, heap = _run("system"), _run("heap")
    assert system["tuned"] is False and heap["tuned"] is True
    pages = 10 * (40 << 20) // 4096  # every round faulting its 40 MiB in anew
    # glibc's defaults: each 40 MiB tensor (over the 32 MiB cap of glibc's mmap threshold) is
    # a fresh mmap, faulted in page by page.
    assert system["main"] > pages // 2 and system["thread"] > pages // 2
    # heap: the freed block is reused, so the rounds after the first barely fault at all.
    assert heap["main"] < pages // 20 and heap["thread"] < pages // 20


def test_a_bad_setting_is_one_error_naming_the_variable_and_the_choices(monkeypatch, capsys):
    from sdftlab.allocator import tune_cpu_allocator
    from sdftlab.cli import main
    from sdftlab.errors import ConfigError

    monkeypatch.setenv("SDFTLAB_CPU_ALLOC", "fast")
    with pytest.raises(ConfigError, match=r"SDFTLAB_CPU_ALLOC='fast'.*heap.*system"):
        tune_cpu_allocator()
    assert main(["lineage"]) == 2
    assert "SDFTLAB_CPU_ALLOC='fast'" in capsys.readouterr().err


def test_the_setting_reaches_ray_workers(monkeypatch):
    from sdftlab.raycluster import worker_env

    monkeypatch.delenv("SDFTLAB_CPU_ALLOC", raising=False)
    assert "SDFTLAB_CPU_ALLOC" not in worker_env()
    monkeypatch.setenv("SDFTLAB_CPU_ALLOC", "system")
    assert worker_env()["SDFTLAB_CPU_ALLOC"] == "system"
