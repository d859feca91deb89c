"""The library's layers hold: every module imports alone, no import circle, and no module
reaches up a layer or across to a sibling algorithm (the import statements are read from the
source, those inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "sdftlab"

# Lowest first. A module may import its own layer and the layers below; in the algorithms'
# layer, one package may not import another (shared pieces move down a layer instead).
# The measurement of CKA itself (statistics, hidden-state capture) knows no store and no Ray:
# a foundation the training loops, the pool and the reports all stand on. Live CKA (the probe
# checked against the lineage, the reference loaded in a worker) stands on the store: plumbing.
CKA_CORE = ("cka.stats", "cka.capture")
CKA_UNITS = (*CKA_CORE, "cka.live")  # units of their own, not of the `cka` package
FOUNDATIONS = {"errors", "config", "paths", "specs", "modes", "chunked", "allocator", "provenance",
               "stats", "console", "placement"}  # fmt: skip
PLUMBING = {"models", "lineage", "verify", "train", "sharding", "raycluster", "data", "rollout"}
LAYERS = [
    {*FOUNDATIONS, *CKA_CORE},  # foundations
    {*PLUMBING, "tracking", "cka.live"},  # the store, and the plumbing around Ray and models
    {"world", "degrade", "distill", "evaluate", "cka", "importer"},  # the algorithms
    # recipes and entry points
    {"report", "runs", "pipelines", "sweep", "plan", "config_files", "cli"},
]
ALGORITHMS = LAYERS[2]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _unit(module: str) -> str:
    """The layer entry a module belongs to: a CKA_UNITS module by itself, else its first part."""
    rest = module.removeprefix("sdftlab.")
    return rest if rest in CKA_UNITS else rest.split(".")[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdftlab"):
            if node.module == "sdftlab":  # `from sdftlab import sharding` (not __version__)
                found |= {f"sdftlab.{a.name}" for a in node.names if not a.name.startswith("__")}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sdftlab.")}
    return found


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_every_module_belongs_to_a_layer():
    units = {_unit(m) for m in _modules() if m != "sdftlab"}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_no_module_imports_up_a_layer_or_across_to_another_algorithm():
    wrong = []
    for module, path in _modules().items():
        if module == "sdftlab":
            continue
        here = _unit(module)
        for imported in _imports(path):
            there = _unit(imported)
            if there == here:
                continue
            if _layer(there) > _layer(here):
                wrong.append(
                    f"{module} imports {imported} (layer {_layer(there)} > {_layer(here)})"
                )
            elif here in ALGORITHMS and there in ALGORITHMS:
                wrong.append(f"{module} imports {imported} (two algorithms)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules():
    graph = defaultdict(set)
    modules = _modules()
    for module, path in modules.items():
        graph[module] = {m for m in _imports(path) if m in modules and m != module}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " → ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for module in modules:
        if module not in state:
            visit(module, [])


def test_every_module_imports_alone():
    """Each module imported first, in a process whose only sdftlab module it is."""
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(_modules())!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('sdftlab')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
