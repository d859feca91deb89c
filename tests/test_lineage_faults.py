"""Nothing invalid enters the lineage: broken sources are refused before a state is committed,
filesystem faults are one clear error, numbers mean what they say, and after a full disk, a
killed save or two writers of one name the lineage holds only whole, verifiable states.

docs/LINEAGE.md tabulates what these tests feed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.cli import main as cli
from sdftlab.errors import LineageError
from sdftlab.importer import import_model
from sdftlab.lineage import Lineage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_tokenizer) -> Path:
    """A small HF model folder (safetensors + tokenizer), as `sdftlab import` takes."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("source") / "model"
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdftlab.cli", "--lineage", str(root), "lineage", "verify"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _no_partial_state(root: Path) -> None:
    """Only whole states are listed, nothing half-written is left in sight, and verify passes."""
    staging = root / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    out = _verify(root)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------- broken sources


@pytest.mark.parametrize(
    ("break_it", "fault"),
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()
                                                         [:-100]), "model.safetensors: truncated"),
        (lambda d: (d / "config.json").write_text("{}"), "config.json: no `model_type`"),
        (lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "intermediate_size": 128})),
         "the weights do not match config.json"),
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer does not load"),
    ],
    ids=["truncated-weights", "empty-config", "shapes-unlike-config", "broken-tokenizer"],
)  # fmt: skip
def test_a_broken_source_is_refused_naming_the_file_and_nothing_is_written(
    source, tmp_path, capsys, break_it, fault
):
    folder = _copy(source, tmp_path / "broken")
    break_it(folder)
    root = tmp_path / "lin"
    assert cli(["--lineage", str(root), "import", str(folder), "--to", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fault in err[0], err
    assert Lineage(root).names() == []
    _no_partial_state(root)


def test_lineage_verify_finds_a_state_changed_on_disk(source, tmp_path, capsys):
    root = tmp_path / "lin"
    lineage = Lineage(root)
    import_model(lineage, str(source), "good", log=lambda _: None)
    import_model(lineage, str(source), "bad", log=lambda _: None)
    weights = lineage.local_path("bad") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # one float changed, the file still whole
    weights.write_bytes(bytes(data))
    assert cli(["--lineage", str(root), "lineage", "verify"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ok   good" and out[1].startswith("BAD  bad: ") and "sha256" in out[1]
    assert out[-1] == "1 of 2 states whole"
    assert cli(["--lineage", str(root), "lineage", "verify", "good"]) == 0


# ----------------------------------------------------------------------- the lineage root


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", str(path)], check=False)


def test_a_bad_lineage_root_is_one_line_before_any_work(source, tmp_path, capsys, mounts):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    readonly = tmp_path / "ro"
    _mount_tmpfs(readonly, "1m", readonly=True)
    mounts.append(readonly)
    cases = {
        str(a_file): "is a file, not a folder",
        str(a_file / "lineage"): "is a file, not a folder",
        str(readonly / "lineage"): "is not writable",
        "foo://bucket/lineage": "Unrecognized filesystem type",
    }
    for root, fault in cases.items():
        t0 = time.perf_counter()
        assert cli(["--lineage", root, "import", str(source), "--to", "x"]) == 2, root
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fault in err[0] and "lineage root" in err[0], (root, err)
        assert time.perf_counter() - t0 < 30  # refused before the import's work
    assert a_file.read_text() == "not a folder"


def test_an_unreachable_bucket_is_one_line(source, tmp_path, monkeypatch):
    for key, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"),
                       ("AWS_EC2_METADATA_DISABLED", "true")):  # fmt: skip
        monkeypatch.setenv(key, value)
    root = "s3://bucket/lineage?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens
    out = subprocess.run(
        [sys.executable, "-m", "sdftlab.cli", "--lineage", root, "import", str(source), "--to",
         "x"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "is unreachable" in err[-1] and "credentials" in err[-1], err


# ----------------------------------------------------------------------- faults while writing


def test_a_full_disk_during_a_state_write_keeps_only_whole_states(source, tmp_path, mounts):
    size = sum(p.stat().st_size for p in source.iterdir())
    root = tmp_path / "small"
    _mount_tmpfs(root, str(int(size * 1.6)))  # one state fits, a second does not
    mounts.append(root)
    lineage = Lineage(root / "lin")
    import_model(lineage, str(source), "first", log=lambda _: None)
    with pytest.raises(LineageError, match=r"state 'second' could not be written.*No space"):
        import_model(lineage, str(source), "second", log=lambda _: None)
    assert lineage.names() == ["first"]
    _no_partial_state(root / "lin")


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pyarrow.fs as pafs
    from sdftlab.lineage import Lineage

    root, source, name, mode, marker = sys.argv[1:6]
    copy = pafs.copy_files
    lineage = Lineage(root)
    if mode == "kill":  # stall after the first file: the parent kills this process there
        def slow_copy(*args, **kwargs):
            copy(*args, **kwargs)
            Path(marker).write_text("copying")
            time.sleep(600)
        pafs.copy_files = slow_copy
    else:  # "race": wait until the other writer has staged its copy too, then commit
        write_meta = lineage._write_meta
        def staged(*args):
            write_meta(*args)
            Path(f"{marker}.{mode}").write_text("staged")
            while not Path(marker).exists():
                time.sleep(0.05)
        lineage._write_meta = staged
    try:
        lineage.save_dir(name, Path(source), kind="import")
    except Exception as err:
        print(f"{type(err).__name__}: {err}")
        sys.exit(2)
""")


def _child(root: Path, source: Path, name: str, mode: str, marker: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(source), name, mode, str(marker)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for(paths: list[Path], timeout: float = 120) -> None:
    t0 = time.perf_counter()
    while not all(p.exists() for p in paths):
        assert time.perf_counter() - t0 < timeout, f"waited for {paths}"
        time.sleep(0.05)


def test_a_process_killed_during_a_save_leaves_no_state(source, tmp_path):
    root, marker = tmp_path / "lin", tmp_path / "copying"
    child = _child(root, source, "x", "kill", marker)
    _wait_for([marker])
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    lineage = Lineage(root)
    assert lineage.names() == [] and not lineage.exists("x")
    assert any((root / ".staging").iterdir())  # the half-written copy, never listed
    assert _verify(root).returncode == 0
    lineage.save_dir("x", source, kind="import")  # the name is free: the save goes through
    lineage.verify("x")


def test_two_writers_of_one_state_name_commit_one_whole_state(source, tmp_path):
    root, go = tmp_path / "lin", tmp_path / "go"
    writers = [_child(root, source, "same", str(i), go) for i in range(2)]
    _wait_for([Path(f"{go}.{i}") for i in range(2)])  # both staged, neither committed
    go.write_text("go")
    outputs = [(w.wait(timeout=120), w.stdout.read()) for w in writers]
    assert sorted(rc for rc, _ in outputs) == [0, 2], outputs
    loser = next(out for rc, out in outputs if rc == 2)
    assert "committed by another writer" in loser and "discarded" in loser
    lineage = Lineage(root)
    assert lineage.names() == ["same"]
    _no_partial_state(root)


# ----------------------------------------------------------------------- numbers


NUMERIC_FLAGS = [  # (command line before the flag, flag, the field it sets)
    (["degrade", "sft", "--from", "base", "--to", "x"], "--steps", "steps"),
    (["degrade", "sft", "--from", "base", "--to", "x"], "--rounds", "rounds"),
    (["degrade", "prune", "--from", "base", "--to", "x"], "--ratio", "ratio"),
    (["degrade", "prune", "--from", "base", "--to", "x"], "--multiple-of", "multiple_of"),
    (["recover", "--student", "forgot", "--to", "x"], "--steps", "steps"),
    (["eval", "base"], "--limit", "limit"),
    (["cka", "--a", "x", "--b", "y"], "--limit", "limit"),
    (["cka", "--a", "x", "--b", "y"], "--actors", "actors"),
    (["cka", "--a", "x", "--b", "y"], "--batch-size", "batch_size"),
]


def _numeric_flags(parser, command: tuple[str, ...] = ()) -> set[tuple[tuple[str, ...], str]]:
    """(command words, flag) of every numeric option, subcommands walked."""
    import argparse

    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _numeric_flags(sub, (*command, name))
        elif action.option_strings and (
            action.type in (int, float) or action.dest in ("limit", "actors", "batch_size")
        ):
            found.add((command, action.option_strings[0]))
    return found


def test_the_table_covers_every_numeric_flag():
    from sdftlab.cli import build_parser

    def words(cmd: list[str]) -> tuple[str, ...]:
        return tuple(w for w in cmd if not w.startswith("-"))[: 2 if cmd[0] == "degrade" else 1]

    covered = {(words(cmd), flag) for cmd, flag, _ in NUMERIC_FLAGS}
    aliases = {"--a": "--state", "--b": "--reference"}
    assert _numeric_flags(build_parser()) == {(c, aliases.get(f, f)) for c, f in covered}


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize(("command", "flag", "field"), NUMERIC_FLAGS,
                         ids=[f"{c[0]}{f}" for c, f, _ in NUMERIC_FLAGS])  # fmt: skip
def test_zero_and_negative_numbers_are_values_checked_like_the_config(
    tmp_path, capsys, command, flag, field, value
):
    """0 is never read as "not given": it is checked by the field's own rule, as in a YAML."""
    root = tmp_path / "lin"
    assert cli(["--lineage", str(root), "--home", str(tmp_path), *command, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdftlab: error: {field}: "), err
    assert not root.exists()  # refused before the lineage was touched


def test_an_empty_sweep_space_is_refused(tmp_path):
    import yaml

    from sdftlab.config import load_config
    from sdftlab.errors import ConfigError
    from sdftlab.sweep import SweepConfig

    sweep = yaml.safe_load((REPO / "jobs/configs/sweep_teacher_lr.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep, "space": {}}))
    with pytest.raises(ConfigError, match=r"^space: "):
        load_config(SweepConfig, path, [])


def test_an_sft_error_about_its_data_names_the_data_not_live_cka(small_world):
    from sdftlab.degrade.sft import SFTConfig, run_sft
    from sdftlab.errors import SdftlabError

    world, lineage, _ = small_world
    for data, fault in ((["science=/nowhere/rows.jsonl"], "/nowhere/rows.jsonl"),
                        (["astronomy"], "unknown task 'astronomy'")):  # fmt: skip
        with pytest.raises(SdftlabError) as err:
            run_sft(lineage, "base", "x", SFTConfig(data=data), data_dir=world.data_dir)
        assert fault in str(err.value) and "live_cka" not in str(err.value)
