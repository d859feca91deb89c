"""The command line as a newcomer meets it: overrides anywhere, every command the docs show
parses, every relative link and anchor of the docs resolves, configs can be inspected, bad
input is one line, and the pipeline configs ship inside the wheel."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdftlab import __version__
from sdftlab.cli import main as cli
from sdftlab.cli import parse

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    ("argv", "overrides"),
    [
        (["eval", "smol", "--tasks", "science", "--engine", "vllm", "dtype=bfloat16"],
         ["dtype=bfloat16"]),
        (["world", "build", "--config", "jobs/configs/world.yaml", "seed=1"], ["seed=1"]),
        (["degrade", "sft", "--from", "base", "--to", "x", "lr=1e-3", "--steps", "3",
          "warmup_steps=0"], ["lr=1e-3", "warmup_steps=0"]),
        (["degrade", "prune", "--from", "e", "--to", "p", "calibration_rows=8"],
         ["calibration_rows=8"]),
        (["recover", "steps=3", "--from", "forgot", "--to", "r"], ["steps=3"]),
        (["run", "jobs/configs/forgetting.yaml", "eval.limit=8", "cka.limit=8"],
         ["eval.limit=8", "cka.limit=8"]),
    ],
)  # fmt: skip
def test_overrides_are_taken_anywhere_on_the_line(argv, overrides):
    assert parse(argv).overrides == overrides


def test_old_state_flags_stay_as_aliases():
    assert parse(["recover", "--student", "forgot", "--to", "r"]).src == "forgot"
    args = parse(["cka", "--a", "forgot", "--b", "expert"])
    assert (args.a, args.b) == ("forgot", "expert")
    args = parse(["cka", "--state", "forgot", "--reference", "expert"])
    assert (args.a, args.b) == ("forgot", "expert")


def test_sft_only_flags_are_refused_for_prune(capsys):
    with pytest.raises(SystemExit) as err:
        parse(["degrade", "prune", "--from", "e", "--to", "p", "--steps", "3"])
    assert err.value.code == 2 and "--steps" in capsys.readouterr().err


def test_version_and_help_with_examples(capsys):
    with pytest.raises(SystemExit):
        parse(["--version"])
    assert capsys.readouterr().out.strip() == f"sdftlab {__version__}"
    with pytest.raises(SystemExit):
        parse(["--help"])
    top = capsys.readouterr().out
    assert "examples:" in top and "sdftlab demo" in top and "SDFT" in top
    for command in ("eval", "recover", "degrade", "run", "config", "cka", "runs"):
        with pytest.raises(SystemExit):
            parse([command, "--help"])
        assert "example:\n  sdftlab " in capsys.readouterr().out, command


def _doc_commands() -> list[tuple[str, int, str]]:
    """Every `sdftlab …` command line in a fenced code block of README.md and docs/*.md."""
    found = []
    for doc in DOCS:
        inside, pending = False, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                inside, pending = not inside, ""
                continue
            if not inside:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            text = re.sub(r"^\$ ", "", text)
            text = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", text)  # environment variables
            for prefix in (".venv/bin/sdftlab ", "sdftlab "):
                if text.startswith(prefix):
                    found.append((doc.name, number, text[len(prefix) :].split("  #")[0]))
    return found


@pytest.mark.parametrize("doc,line,command", _doc_commands(),
                         ids=[f"{d}:{n}" for d, n, _ in _doc_commands()])  # fmt: skip
def test_every_command_in_the_docs_parses(doc, line, command):
    argv = shlex.split(command, comments=True)
    assert parse(argv).func is not None, (doc, line, command)


def test_the_docs_show_commands():
    assert len(_doc_commands()) >= 20


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines()
            if line.startswith("#")}  # fmt: skip


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_show_on_every_shipped_config(path, capsys):
    assert cli(["config", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| key | value | default | meaning |" in out and out.count("\n| ") > 10
    assert cli(["config", "validate", str(path)]) == 0


def test_config_show_of_the_defaults_of_a_kind(capsys):
    assert cli(["config", "show", "--kind", "recover", "loss.topk=20"]) == 0
    out = capsys.readouterr().out
    assert "| loss.topk | 20 | null |" in out and "| steps | 100 | = |" in out


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "jobs/configs/forgetting.yaml", "stages.expert.stepz=3"], "stepz"),
        (["run", "jobs/configs/forgetting.yaml", "stages.expert.teacher=base"], "teacher"),
        (["run", "jobs/configs/nothing_here.yaml"], "nothing_here.yaml"),
        (["run", "jobs/configs/sweep_teacher_lr.yaml"], "sdftlab sweep"),
        (["config", "show", "jobs/configs/forgetting.yaml", "eval.limit=-3"], "eval.limit"),
        (["recover", "--to", "x"], "--from"),
    ],
    ids=["unknown-key", "key-of-another-kind", "missing-file", "sweep-config", "bad-value",
         "no-from"],
)  # fmt: skip
def test_bad_input_is_one_line_naming_what_was_written(tmp_path, capsys, argv, said):
    assert cli(["--home", str(tmp_path / "home"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (tmp_path / "home").exists()  # nothing written


def _uv() -> str:
    local = REPO / ".uv" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    assert found, "uv is installed by scripts/setup.sh into .uv/"
    return found


@pytest.mark.slow
def test_the_wheel_ships_the_pipeline_configs_and_finds_them(tmp_path):
    """`pip install .` (not editable) can run `sdftlab demo`: its default config is inside."""
    subprocess.run([_uv(), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("sdftlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in CONFIGS:
        assert f"sdftlab/configs/{config.name}" in names, config.name
    site = tmp_path / "site"
    install = [_uv(), "pip", "install", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run([*install, "--python", sys.executable], check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    found = subprocess.run(
        [sys.executable, "-c", "from sdftlab.config_files import packaged_config; "
         "print(packaged_config('forgetting'))"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        check=True, timeout=120, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert found.startswith(str(site)) and found.endswith("sdftlab/configs/forgetting.yaml")
