"""The lineage store: named model states with their parents, configs and metrics.

A state is a Hugging Face model directory (safetensors weights, config, tokenizer) plus
`sdftlab_state.json` (name, parents, stage kind, config, metrics, creation time, content
hash, and its provenance: commit, lock hash, library versions, machine and seeds —
`sdftlab.provenance`). States are addressed by name — `base`, `expert`, `forgot`, … — so a
later stage picks its teacher by name. The root is a local path or any URI `pyarrow.fs` understands
(`s3://bucket/lineage`, `gs://…`, `file:///…`), so a cluster can share one store.

Nothing invalid is committed: a state's directory is checked before it is copied
(`sdftlab.verify.check_state_dir`: its config, every weight file whole, the weights' names
and shapes against the config, the tokenizer, one forward pass), then written under
`.staging/` and moved into `states/<name>` only when complete (a rename on a local disk); its
metadata file is the last thing written, and a state without one is never listed. An
interrupted save leaves nothing visible. `verify(name)` checks a committed state again
against its recorded sha256 (`sdftlab lineage verify`).

    sdftlab lineage                    # the states as a tree, with key metrics

    >>> store = Lineage("/tmp/lin")
    >>> store.save("base", model, tokenizer, kind="world", config={...})
    >>> model = store.load_model("base")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from sdftlab import console, provenance
from sdftlab.errors import LineageError
from sdftlab.verify import check_state_dir

META_FILE = "sdftlab_state.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# Metrics shown beside each state in `sdftlab lineage`, in this order, when present.
KEY_METRICS = (
    "science/acc",
    "science/acc_demo",
    "tooluse/acc",
    "tooluse/acc_demo",
    "mmlu/acc",
    "mmlu/acc_cloze",
    "winogrande/acc",
)


class EvalRows(BaseModel):
    """One evaluation's rows, for paired comparisons between states on the same rows: each
    row's id, its independent unit (the fact a question is about; the row itself where the
    data names none) and whether the answer was right ("1") or not ("0")."""

    uid: list[str]
    unit: list[str]
    correct: str = Field(pattern=r"^[01]*$")

    def scores(self) -> dict[str, tuple[str, float]]:
        """uid → (unit, 0.0 or 1.0)."""
        return {u: (g, float(c)) for u, g, c in zip(self.uid, self.unit, self.correct, strict=True)}


class StateMeta(BaseModel):
    """What the store knows about one state besides its weights."""

    name: str
    parents: list[str] = Field(default_factory=list)
    kind: str
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    # per-row results of the generation tasks, by accuracy metric ("science/acc", ...)
    rows: dict[str, EvalRows] = Field(default_factory=dict)
    created_at: str
    content_hash: str
    files: list[str] = Field(default_factory=list)
    # commit, lock hash, library versions, machine and seeds (`sdftlab.provenance.collect`)
    provenance: dict[str, Any] = Field(default_factory=dict)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise LineageError(
            f"state name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit (e.g. 'expert' or 'sdft-t_base')"
        )
    return name


def content_hash(directory: str | os.PathLike[str]) -> str:
    """sha256 over the weight files (name and bytes, sorted by name)."""
    digest = hashlib.sha256()
    weights = sorted(p for p in Path(directory).iterdir() if p.suffix == ".safetensors")
    if not weights:
        raise LineageError(f"{directory} holds no .safetensors weights; save with safetensors")
    for path in weights:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _filesystem(root: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local) for a local path or a URI."""
    if "://" in root:
        try:
            fs, path = pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, ValueError) as err:
            raise LineageError(
                f"lineage root {root}: {err}; give a local path or a file://, s3:// or gs:// URI"
            ) from None
        return fs, path.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve()), True


class Lineage:
    """A store of named model states under `root` (a local path or a pyarrow.fs URI)."""

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | None = None) -> None:
        self.root = str(root)
        self.fs, self._base, self.is_local = _filesystem(self.root)
        self._cache = Path(cache_dir or Path.home() / ".cache" / "sdftlab" / "lineage")

    # -------------------------------------------------------------- paths and listing

    def _state_path(self, name: str) -> str:
        return f"{self._base}/states/{name}"

    def names(self) -> list[str]:
        """Names of the complete states, sorted by creation time."""
        selector = pafs.FileSelector(f"{self._base}/states", allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as err:
            self.check_writable()  # names the root's problem, if it has one
            raise LineageError(f"lineage root {self.root} cannot be listed ({err})") from None
        found = [info.base_name for info in infos if info.type == pafs.FileType.Directory]
        complete = [n for n in found if self._exists_meta(n)]
        return sorted(complete, key=lambda n: (self.meta(n).created_at, n))

    def _exists_meta(self, name: str) -> bool:
        info = self.fs.get_file_info(f"{self._state_path(name)}/{META_FILE}")
        return info.type == pafs.FileType.File

    def exists(self, name: str) -> bool:
        return _NAME_RE.match(name) is not None and self._exists_meta(name)

    def meta(self, name: str) -> StateMeta:
        self.require(name)
        with self.fs.open_input_stream(f"{self._state_path(name)}/{META_FILE}") as fh:
            return StateMeta.model_validate_json(fh.read())

    def require(self, name: str) -> None:
        """Raise a `LineageError` listing the known states if `name` is not one of them."""
        if not self.exists(name):
            known = ", ".join(self.names()) or "none yet — run `sdftlab world build`"
            raise LineageError(
                f"unknown state {name!r} in lineage {self.root}; known states: {known}"
            )

    # -------------------------------------------------------------- writing

    def save(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        *,
        kind: str,
        parents: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> StateMeta:
        """Save a transformers model + tokenizer as state `name`, atomically."""
        with tempfile.TemporaryDirectory(prefix="sdftlab-save-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            return self.save_dir(
                name,
                tmp,
                kind=kind,
                parents=parents,
                config=config,
                metrics=metrics,
                overwrite=overwrite,
            )

    def save_dir(
        self,
        name: str,
        directory: str | os.PathLike[str],
        *,
        kind: str,
        parents: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> StateMeta:
        """Register an already-written HF directory as state `name` (copied, atomically)."""
        self.check_new(name, parents=parents or [], overwrite=overwrite, warn=False)
        src = Path(directory)
        if any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in src.iterdir()):
            raise LineageError(
                f"{src} holds pickle-format weights; states are safetensors only "
                "(save with safe_serialization=True)"
            )
        check_state_dir(src)  # a state that does not load is never committed
        meta = StateMeta(
            name=name,
            parents=list(parents or []),
            kind=kind,
            config=dict(config or {}),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            content_hash=content_hash(src),
            files=sorted(p.name for p in src.iterdir() if p.is_file()),
            provenance=provenance.collect(config),
        )
        staging = f"{self._base}/.staging/{name}.{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(staging, recursive=True)
            for path in sorted(src.iterdir()):
                if path.is_file():
                    pafs.copy_files(
                        str(path),
                        f"{staging}/{path.name}",
                        source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs,
                    )
            self._write_meta(staging, meta)  # last: a state without metadata is not a state
            self.fs.create_dir(f"{self._base}/states", recursive=True)
            self._commit(name, staging, overwrite)
        except BaseException as err:
            self._discard(staging)
            if isinstance(err, OSError):
                raise LineageError(
                    f"state {name!r} could not be written to {self.root} ({err}); nothing of it "
                    "was kept: free space there, or give another lineage"
                ) from None
            raise
        return meta

    def _commit(self, name: str, staging: str, overwrite: bool) -> None:
        """Move the staged state into place: one rename, which fails rather than merge into a
        state another writer committed meanwhile (`overwrite` moves the old one aside first)."""
        final = self._state_path(name)
        trash = None
        if overwrite and self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            trash = f"{self._base}/.trash/{name}.{uuid.uuid4().hex[:8]}"
            self.fs.create_dir(f"{self._base}/.trash", recursive=True)
            try:
                self.fs.move(final, trash)
            except OSError:  # another writer moved it first
                trash = None
        try:
            self.fs.move(staging, final)
        except OSError:
            if self.exists(name):
                raise LineageError(
                    f"state {name!r} was committed by another writer while this one wrote it; "
                    "this copy was discarded (give another name, or overwrite it)"
                ) from None
            raise
        finally:
            if trash is not None:
                self._discard(trash)

    def _discard(self, path: str) -> None:
        with contextlib.suppress(OSError):
            self.fs.delete_dir(path)

    def check_new(
        self, name: str, *, parents: list[str], overwrite: bool = False, warn: bool = True
    ) -> None:
        """Before any work: `name` is a valid, free name (or `overwrite`), and not one of its
        `parents`, which all exist. `warn`: one line on stderr for each parent made under
        other library versions than this process has."""
        check_name(name)
        self.check_writable()
        for parent in parents:
            self.require(parent)
            changed = provenance.drift(self.meta(parent).provenance) if warn else []
            if changed:
                console.warn(f"{parent!r} was made under other library versions "
                             f"({', '.join(changed)}); {name!r} continues from it")  # fmt: skip
        if name in parents:
            raise LineageError(f"dst {name!r} is the source state; a stage writes a new state")
        if self.exists(name) and not overwrite:
            raise LineageError(
                f"state {name!r} already exists in {self.root}; choose another name or pass "
                "overwrite=True (`--overwrite`) to replace it"
            )

    def check_writable(self) -> None:
        """Before any work: the root is a folder this process can write to (or can become
        one), and its storage answers. One `LineageError` naming the root and the fix."""
        try:
            info = self.fs.get_file_info(self._base)
        except OSError as err:
            reason = str(err).splitlines()[0][:200]
            raise LineageError(
                f"lineage root {self.root} is unreachable ({reason}); check the bucket, the "
                "endpoint and the credentials, or give a local --lineage"
            ) from None
        if info.type == pafs.FileType.File:
            raise LineageError(
                f"lineage root {self.root} is a file, not a folder; give a folder (or a new "
                "path) as --lineage / $SDFTLAB_LINEAGE"
            )
        if self.is_local:
            existing = Path(self._base)
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir():
                raise LineageError(f"lineage root {self.root}: {existing} is a file, not a "
                                   "folder; give another --lineage")  # fmt: skip
            if not os.access(existing, os.W_OK | os.X_OK):
                raise LineageError(
                    f"lineage root {self.root} is not writable ({existing} is read-only); "
                    "give another --lineage, or make it writable"
                )

    def _write_meta(self, state_dir: str, meta: StateMeta) -> None:
        tmp = f"{state_dir}/{META_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(meta.model_dump_json(indent=2).encode())
        self.fs.move(tmp, f"{state_dir}/{META_FILE}")

    def record_metrics(
        self,
        name: str,
        metrics: Mapping[str, float],
        rows: Mapping[str, EvalRows] | None = None,
    ) -> StateMeta:
        """Merge `metrics` (and per-row results `rows`) into the state's metadata (atomic
        replace of the metadata file)."""
        meta = self.meta(name)
        meta.metrics.update({k: float(v) for k, v in metrics.items()})
        meta.rows.update(rows or {})
        self._write_meta(self._state_path(name), meta)
        return meta

    def verify(self, name: str) -> None:
        """Raise a `LineageError` unless state `name` is whole: its files there, its weights'
        sha256 the recorded one, and it loads (`verify.check_state_dir`)."""
        meta = self.meta(name)
        path = self.local_path(name)  # a remote state is downloaded and its hash checked
        missing = [f for f in meta.files if not (path / f).is_file()]
        if missing:
            raise LineageError(f"state {name!r}: {', '.join(missing)} missing from {path}")
        if self.is_local and content_hash(path) != meta.content_hash:
            raise LineageError(
                f"state {name!r}: its weights' sha256 differs from the one recorded when it "
                "was saved (changed or corrupt on disk)"
            )
        check_state_dir(path)

    def delete(self, name: str) -> None:
        self.require(name)
        children = [n for n in self.names() if name in self.meta(n).parents]
        if children:
            raise LineageError(
                f"state {name!r} is the parent of {', '.join(children)}; delete those first"
            )
        self.fs.delete_dir(self._state_path(name))

    # -------------------------------------------------------------- reading

    def local_path(self, name: str) -> Path:
        """A local directory holding the state (the store itself, or a verified cache copy)."""
        meta = self.meta(name)
        if self.is_local:
            return Path(self._state_path(name))
        target = self._cache / meta.content_hash
        if not (target / META_FILE).is_file():
            self._cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=self._cache))
            pafs.copy_files(
                self._state_path(name),
                str(tmp),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
            if content_hash(tmp) != meta.content_hash:
                shutil.rmtree(tmp, ignore_errors=True)
                raise LineageError(f"state {name!r}: downloaded weights do not match its hash")
            os.replace(tmp, target)
        return target

    def resolve(self, ref: str) -> Path:
        """A state name, or a path to a Hugging Face model directory, to a local directory."""
        if self.exists(ref):
            return self.local_path(ref)
        path = Path(ref).expanduser()
        if (path / "config.json").is_file():
            return path
        self.require(ref)  # raises with the list of known states
        raise AssertionError("unreachable")

    def label(self, ref: str) -> str:
        """How `ref` appears in metric names: the state name, or a model directory's name."""
        return ref if self.exists(ref) else Path(ref).expanduser().name

    def load_model(self, ref: str, **kwargs: Any) -> Any:
        """The state's model (`models.load_model`: safetensors only, no remote code)."""
        from sdftlab.models import load_model

        return load_model(self.resolve(ref), **kwargs)

    def load_tokenizer(self, ref: str) -> Any:
        from sdftlab.models import load_tokenizer

        return load_tokenizer(self.resolve(ref))

    # -------------------------------------------------------------- display

    def tree(self, metrics: tuple[str, ...] = KEY_METRICS) -> str:
        """The states as a tree (children under parents) with their key metrics."""
        names = self.names()
        if not names:
            return f"(lineage {self.root} is empty — run `sdftlab world build`)"
        metas = {n: self.meta(n) for n in names}
        children: dict[str, list[str]] = {n: [] for n in names}
        roots = []
        for n, m in metas.items():
            known_parents = [p for p in m.parents if p in metas]
            if known_parents:
                children[known_parents[0]].append(n)
            else:
                roots.append(n)
        lines = [f"lineage {self.root}"]

        def label(n: str) -> str:
            m = metas[n]
            shown = [f"{k}={m.metrics[k]:.3f}" for k in metrics if k in m.metrics]
            extra = f"  [{', '.join(shown)}]" if shown else ""
            also = m.parents[1:]
            with_parents = f" (+ {', '.join(also)})" if also else ""
            return f"{n}  <{m.kind}>{with_parents}{extra}"

        def walk(n: str, prefix: str, last: bool) -> None:
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label(n)}")
            kids = children[n]
            for i, kid in enumerate(kids):
                walk(kid, prefix + ("    " if last else "│   "), i == len(kids) - 1)

        for i, root in enumerate(roots):
            walk(root, "", i == len(roots) - 1)
        return "\n".join(lines)
