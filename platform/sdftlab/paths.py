"""Where sdftlab keeps things on disk, in one place.

- `sdftlab_home()`: worlds, task data, evaluation text and (by default) the lineage —
  `$SDFTLAB_HOME`, else `./.sdftlab`;
- `atomic_write(path)`: a file written whole or not at all (a temporary file beside it,
  synced, then renamed over the path);
- `storage_path()`: Ray Train and Ray Tune runs (checkpoints to resume from) —
  `$SDFTLAB_STORAGE` (a path or a URI such as `s3://…`, shared storage on a cluster), else
  `<home>/ray_results`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """A file handle whose content lands at `path` whole or not at all: written to a temporary
    file in the same folder, synced, then renamed over `path` (an interrupted write leaves
    the old file, or none)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
