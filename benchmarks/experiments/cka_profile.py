"""Profile the CKA statistics form against the Gram form with py-spy: where the time goes.

Run from the repository root (py-spy: `.venv/bin/python -m pip install py-spy`):

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/cka_profile.py [--d 4096 --n 1000]

The case benchmarks/cka_stats.py reports as a miss (d = 4096, n = 10³). A child process runs
`run_stats` and then `run_gram` from that benchmark on the same rows (`--repeat` times each)
under `py-spy record --native`; this script reads py-spy's collapsed stacks and prints, per
method, the share of its samples at each line of the statistics code (or of the Gram
benchmark) and the native routine (BLAS kernel, numpy loop) underneath it, then the same
shares summed per line. A sample's line is its innermost frame in `sdftlab/cka/stats.py` or
`benchmarks/cka_stats.py`; its routine is its innermost native frame. The floating-point
work of each form is printed beside it: statistics 4·n·d² (UᵀU and VᵀV as symmetric rank-n
updates, UᵀV as a full product), Gram 2·n²·d (two n×n kernels); their ratio is 2d/n, so
below n = 2d no implementation of the d×d statistics can beat the Gram form, let alone by 10×.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
PY_FILES = ("cka/stats.py", "cka_stats.py")  # as py-spy names them
METHODS = {"run_stats": "stats", "run_gram": "gram"}


def child(d: int, n: int, repeat: int) -> None:
    """The profiled workload: each form `repeat` times on the same rows; prints every run's
    wall time and the best timed part (the form's own work, without generating the rows)."""
    from cka_stats import run_gram, run_stats

    for name, fn in (("stats", run_stats), ("gram", run_gram)):
        wall, timed = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            timed.append(fn(n, d)["time_s"])
            wall.append(time.perf_counter() - t0)
        print(json.dumps({"method": name, "wall_s": wall, "timed_s": min(timed)}))


def parse_frame(frame: str) -> tuple[str, str, str]:
    m = FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), "", ""
    return m["fn"], m["file"], m["line"] or ""


def summarize(raw: Path) -> dict[str, collections.Counter[tuple[str, str]]]:
    """Samples per method, keyed by (innermost project line, innermost native routine)."""
    out: dict[str, collections.Counter[tuple[str, str]]] = {
        m: collections.Counter() for m in METHODS.values()
    }
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        frames = [parse_frame(f) for f in stack.split(";")]
        method = next((METHODS[fn] for fn, _, _ in frames if fn in METHODS), None)
        if method is None:
            continue
        line, native = "(other)", "(python)"
        for fn, file, lineno in frames:
            if any(file.endswith(p) for p in PY_FILES):
                line = f"{Path(file).name}:{lineno} {fn}"
                native = "(python)"
            elif not file.endswith(".py") and not file.startswith("<"):
                native = fn  # a native frame below the last Python line
        out[method][(line, native)] += int(count)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=8, help="rows per method")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.d, args.n, args.repeat)
        return
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        sys.exit("py-spy is not installed: .venv/bin/python -m pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="cka-profile-") as tmp:
        raw = Path(tmp) / "stacks.txt"
        cmd = [
            pyspy,
            "record",
            "--native",
            "--format",
            "raw",
            "--rate",
            str(args.rate),
            "--output",
            str(raw),
            "--",
            sys.executable,
            __file__,
            "--child",
            "--d",
            str(args.d),
            "--n",
            str(args.n),
            "--repeat",
            str(args.repeat),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        timings = [json.loads(t) for t in proc.stdout.splitlines() if t.startswith("{")]
        counts = summarize(raw)
    flops = {"stats": 4 * args.n * args.d**2, "gram": 2 * args.n**2 * args.d}
    ratio = flops["stats"] / flops["gram"]
    print(
        f"d={args.d} n={args.n}, {args.repeat} runs each under py-spy --native "
        f"({args.rate} Hz); statistics/Gram floating-point work = {ratio:.1f}×"
    )
    summary = []
    for t in timings:
        method = t["method"]
        total = sum(counts[method].values()) or 1
        best = min(t["wall_s"])
        print(
            f"\n{method}: best wall {best:.3f} s (timed part {t['timed_s']:.3f} s), "
            f"{flops[method] / 1e9:.1f} GFLOP → {flops[method] / t['timed_s'] / 1e9:.1f} GFLOP/s"
        )
        print("| share | line | native routine |\n|---:|---|---|")
        rows = counts[method].most_common(args.top)
        for (line, native), c in rows:
            print(f"| {100 * c / total:.1f}% | {line} | {native} |")
        by_line: collections.Counter[str] = collections.Counter()
        for (line, _), c in counts[method].items():
            by_line[line] += c
        print(
            "\nby line: "
            + "; ".join(
                f"{line} {100 * c / total:.1f}%" for line, c in by_line.most_common(args.top)
            )
        )
        top = [{"line": ln, "native": nt, "share": c / total} for (ln, nt), c in rows]
        summary.append({**t, "gflop": flops[method] / 1e9, "samples": total, "top": top})
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
