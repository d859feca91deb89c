"""Where sdftlab keeps things on disk, in one place.

- `sdftlab_home()`: worlds, task data, evaluation text and (by default) the lineage —
  `$SDFTLAB_HOME`, else `./.sdftlab`;
- `storage_path()`: Ray Train and Ray Tune runs (checkpoints to resume from) —
  `$SDFTLAB_STORAGE` (a path or a URI such as `s3://…`, shared storage on a cluster), else
  `<home>/ray_results`.
"""

from __future__ import annotations

import os
from pathlib import Path


def sdftlab_home() -> Path:
    """Where worlds and the default lineage live: `$SDFTLAB_HOME`, else `./.sdftlab`."""
    return Path(os.environ.get("SDFTLAB_HOME", ".sdftlab")).expanduser().resolve()


def storage_path() -> str:
    """Where Ray Train/Tune persist runs: `$SDFTLAB_STORAGE` (a path or URI), else a local dir."""
    env = os.environ.get("SDFTLAB_STORAGE")
    if env:
        return env
    path = sdftlab_home() / "ray_results"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
