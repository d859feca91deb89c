"""Where sdftlab keeps things on disk, in one place.

- `sdftlab_home()`: worlds, task data, evaluation text and (by default) the lineage —
  `$SDFTLAB_HOME`, else `./.sdftlab`;
- `lineage_root(...)`: the lineage — `--lineage`, else the config's `lineage:`, else
  `$SDFTLAB_LINEAGE`, else `<home>/lineage`; a config that names another lineage than the
  environment wins with one warning line naming both;
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


LINEAGE_ENV = "SDFTLAB_LINEAGE"


def lineage_root(given: str | None, configured: str | None, home: Path) -> str:
    """The lineage's root: `given` (the command's --lineage), else `configured` (the
    experiment config's `lineage:`), else $SDFTLAB_LINEAGE, else `<home>/lineage`. An
    environment set for every job of a cluster is overruled by a config that names a lineage,
    never silently: one warning line names both."""
    env = os.environ.get(LINEAGE_ENV)
    if given:
        return given
    if configured:
        if env and env != configured:
            from sdftlab import console

            console.warn(
                f"the config's lineage {configured} is used, not ${LINEAGE_ENV}={env}; "
                "remove `lineage:` from the config to use the environment's"
            )
        return configured
    return env or str(home / "lineage")


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
