"""The environment is the lock: installed versions equal uv.lock's, the lock is current with
pyproject.toml, and scripts/setup.sh refuses a lock that does not fit the machine before it
writes anything."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sdftlab import provenance
from sdftlab.provenance import LOCK_FILE, LOCKED_LIBRARIES, PROJECT_ROOT


def test_the_installed_libraries_are_the_locked_versions():
    assert provenance.variant() in ("cpu", "gpu"), "no vLLM installed: bash scripts/setup.sh"
    locked = provenance.locked_versions()
    assert set(locked) == set(LOCKED_LIBRARIES), f"missing from uv.lock: {locked.keys()}"
    installed = {lib: provenance.installed_version(lib) for lib in LOCKED_LIBRARIES}
    assert installed == locked


def test_the_environment_records_the_lock_it_was_installed_from():
    """`scripts/setup.sh` writes the lock's sha256 into the environment: the provenance of a
    state made anywhere this environment runs (a job's shipped copy too) names its lock."""
    import hashlib

    recorded = provenance.INSTALLED_LOCK.read_text().split()[0]
    assert recorded == hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()
    assert provenance.lock_hash() == recorded


def test_every_installed_distribution_the_lock_holds_is_at_its_locked_version():
    """Not only the ten that decide a figure: nothing the lock pins drifted in the environment
    (a tool installed beside it, such as py-spy, is not the lock's business, nor is a package
    on a path outside the environment, such as one on the machine's PYTHONPATH)."""
    lock = tomllib.loads(LOCK_FILE.read_text())
    versions: dict[str, set[str]] = {}
    for pkg in lock["package"]:
        versions.setdefault(pkg["name"], set()).add(pkg["version"])
    site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    off, held = [], 0
    for dist in metadata.distributions(path=sorted(site)):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name == "sdftlab" or name not in versions:
            continue
        held += 1
        if dist.version not in versions[name]:
            off.append(f"{name} {dist.version} at {dist.locate_file('')} (lock: "
                       f"{sorted(versions[name])})")  # fmt: skip
    assert not off, off
    assert held > 150, f"only {held} of the lock's packages found in {site}"


def _requirement(name: str, extras: list[str], specifier: str, marker: str) -> tuple:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return (name, tuple(sorted(extras)), str(SpecifierSet(specifier)), marker)


def test_the_lock_is_current_with_pyproject():
    """uv.lock records the project's own requirements; a pyproject edit without `bash
    scripts/setup.sh --relock` shows here (`uv sync --frozen` would install the old lock)."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = set()
    for extra, reqs in [("", project["dependencies"]), *project["optional-dependencies"].items()]:
        for req in map(Requirement, reqs):
            marker = f"extra == '{extra}'" if extra else ""
            wanted.add(_requirement(req.name, list(req.extras), str(req.specifier), marker))
    lock = tomllib.loads(LOCK_FILE.read_text())
    (me,) = [p for p in lock["package"] if p["name"] == "sdftlab"]
    recorded = {
        _requirement(r["name"], r.get("extras", []), r.get("specifier", ""), r.get("marker", ""))
        for r in me["metadata"]["requires-dist"]
    }
    assert recorded == wanted


def _setup(*args: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "setup.sh"), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": path},
    )  # fmt: skip


def test_the_gpu_lock_on_a_machine_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    if shutil.which("nvidia-smi"):
        import pytest

        pytest.skip("this machine has nvidia-smi: the refusal is for machines without one")
    kept = [p for p in (PROJECT_ROOT / ".venv", PROJECT_ROOT / ".uv") if p.exists()]
    before = {p: p.stat().st_mtime_ns for p in kept}
    out = _setup("--gpu", path=os.environ["PATH"])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0] and "--cpu" in lines[0], out.stderr
    assert out.stdout == ""
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    assert [p for p in (PROJECT_ROOT / ".venv", PROJECT_ROOT / ".uv") if p.exists()] == kept


def test_an_unknown_setup_option_is_one_line():
    out = _setup("--gpus", path=os.environ["PATH"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--gpus" in out.stderr
