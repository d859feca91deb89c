"""Shared by the benchmarks that time a whole SFT stage: each run a fresh process that starts
Ray the project's way (`ensure_ray`) and runs `degrade.sft.run_sft` from `base` on the current
world's science data, into a scratch lineage beside the world's.

A fresh process per run keeps one run's Ray cluster, caches and warm imports out of the next;
each run also gets its own Ray Train storage, since Ray Train restores a finished run of the
same name instead of training again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdftlab.lineage import Lineage
from sdftlab.paths import sdftlab_home

CHILD = """
import json, sys, time
from sdftlab.raycluster import ensure_ray
ensure_ray()  # the project's own start-up; RAY_worker_niceness from the environment wins
from sdftlab.degrade.sft import SFTConfig, run_sft
from sdftlab.lineage import Lineage
from sdftlab.world.build import current_world
lineage = Lineage(sys.argv[1])
cfg = SFTConfig(data=["science"], steps=int(sys.argv[3]), **json.loads(sys.argv[4]))
t0 = time.perf_counter()
meta = run_sft(lineage, "base", sys.argv[2], cfg, data_dir=current_world().data_dir,
               log=lambda _: None, overwrite=True)
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, **meta.metrics}))
"""


@contextlib.contextmanager
def scratch_lineage(prefix: str) -> Iterator[Path]:
    """A lineage root holding a copy of the current world's `base`; removed afterwards."""
    home = sdftlab_home()
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=home))
    try:
        root = scratch / "lineage"
        (root / "states").mkdir(parents=True)
        shutil.copytree(Lineage(home / "lineage").local_path("base"), root / "states" / "base")
        yield root
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_stage(
    lineage_root: Path,
    name: str,
    steps: int,
    *,
    sft: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    bars: bool = False,
) -> dict[str, Any]:
    """One SFT stage (`sft`: SFTConfig overrides) in a fresh process; its wall seconds and
    the state's metrics (`sft/loss`, `sft/seconds`, `sft/tokens_per_s`)."""
    child_env = {
        **os.environ,
        **(env or {}),
        "SDFTLAB_STORAGE": str(lineage_root.parent / "ray_results" / name),
    }
    child_env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
    if not bars:  # as the pipelines run; `sdftlab degrade` / `recover` show Ray Data's bars
        child_env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    args = [str(lineage_root), name, str(steps), json.dumps(sft or {})]
    return run_child(CHILD, args, child_env, f"SFT run {name}")


def run_child(code: str, args: Sequence[str], env: Mapping[str, str], what: str) -> dict[str, Any]:
    """Run `code` in a fresh Python process with `args` and `env`; the JSON of its last
    `RESULT ` line (a `RuntimeError` naming `what`, with the stderr tail, if it fails)."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def alternate(
    lineage_root: Path, settings: Mapping[str, Mapping[str, Any]], steps: int, repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """`run_stage` for each setting (label → its keyword arguments) in turn, `repeats` rounds,
    so a change in the machine's speed hits every setting alike; each setting's results, and
    a line per run as it ends."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
    for r in range(repeats):
        for i, (label, kwargs) in enumerate(settings.items()):
            result = run_stage(lineage_root, f"setting{i}_{r}", steps, **kwargs)
            runs[label].append(result)
            print(
                f"  {label}, run {r + 1}: {result['wall_s']:.1f} s "
                f"(fit {result['sft/seconds']:.1f} s), {result['sft/tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
    return runs


def same_loss(runs: Mapping[str, list[dict[str, Any]]]) -> bool:
    """Whether every run ended at the same loss (settings that change no arithmetic must)."""
    return len({round(x["sft/loss"], 8) for rs in runs.values() for x in rs}) == 1
