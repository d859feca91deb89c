"""The `sdftlab` command.

    sdftlab world build [--config world.yaml] [key=value ...]   build the tiny world + `base`
    sdftlab world info                                           where the current world lives
    sdftlab import SOURCE --to NAME      an HF folder, a .gguf file, a hub id or smollm2-135m
    sdftlab eval STATE [--tasks science,tooluse,mmlu,winogrande] [--demo] [--data task=PATH]
                       [--engine vllm] [max_new_tokens=N kv_cache_gb=G ...]
    sdftlab degrade sft --from base --to expert --data science [--steps N] [key=value ...]
    sdftlab degrade quantize --from expert --to nf4
    sdftlab degrade prune --from expert --to pruned10 --ratio 0.1 [--importance taylor]
    sdftlab cka --a forgot --b expert [--data science] [--actors 2] [--plot cka.png] [key=value]
    sdftlab lineage [tree | list | show NAME | verify [NAME] | rm NAME]
                                 (show: provenance, then metadata; verify: sha256 + loads)
    sdftlab runs [--dir runs]                    every pipeline run with its headline metrics
    sdftlab runs compare A B [--metrics m,...]   per-state differences between two runs
    sdftlab plan CONFIG [key=value ...]   each stage's memory per device, before any work

Global: `--home DIR` (worlds and the default lineage; `$SDFTLAB_HOME`, else `./.sdftlab`) and
`--lineage ROOT` (a path or a pyarrow.fs URI; `$SDFTLAB_LINEAGE`, else `<home>/lineage`).
User errors print one line naming the field and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sdftlab.allocator import tune_cpu_allocator
from sdftlab.errors import SdftlabError


def _lineage(args: argparse.Namespace, from_config: str | None = None):
    """--lineage, else the experiment config's `lineage`, else $SDFTLAB_LINEAGE, else home."""
    from sdftlab.lineage import Lineage

    root = (
        args.lineage
        or from_config
        or os.environ.get("SDFTLAB_LINEAGE")
        or str(_home(args) / "lineage")
    )
    return Lineage(root)


def _flag_overrides(args: argparse.Namespace, *flags: str) -> list[str]:
    """The command's `key=value` overrides, then one for each of `flags` given (a value of 0
    is given, not absent); `--data a,b` is the list [a,b]."""
    overrides = list(args.overrides)
    for flag in flags:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{flag}=[{value}]" if flag == "data" else f"{flag}={value}")
    return overrides


def _home(args: argparse.Namespace) -> Path:
    from sdftlab.paths import sdftlab_home

    if args.home:
        os.environ["SDFTLAB_HOME"] = args.home
    return sdftlab_home()


def cmd_world(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config
    from sdftlab.world.build import build_world, current_world
    from sdftlab.world.config import WorldConfig

    if args.action == "build":
        cfg = load_config(WorldConfig, args.config, args.overrides)
        world = build_world(cfg, _lineage(args), _home(args), overwrite=args.overwrite)
        print(f"data: {world.data_dir}")
        return 0
    world = current_world(_home(args))
    print(
        json.dumps(
            {
                "directory": str(world.directory),
                **json.loads((world.directory / "world.json").read_text()),
            },
            indent=2,
        )
    )
    return 0


def _data_overrides(items: list[str]) -> dict[str, Path]:
    files = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise SdftlabError(f"--data {item!r}: write TASK=PATH, e.g. --data science=eval.jsonl")
        files[task] = Path(path)
    return files


def cmd_import(args: argparse.Namespace) -> int:
    from sdftlab.importer import import_model

    lineage = _lineage(args)
    import_model(lineage, args.source, args.dst, overwrite=args.overwrite)
    print(lineage.tree())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config
    from sdftlab.evaluate.run import default_task_files, evaluate_state, metrics_table, parse_tasks
    from sdftlab.specs import EvalEngineSpec, EvalSpec
    from sdftlab.world.build import current_world

    engine = load_config(EvalEngineSpec, None, [f"engine={args.engine}", *args.overrides])
    if args.limit is not None:  # the pipelines' rule for eval.limit: a positive count
        load_config(EvalSpec, None, [f"limit={args.limit}"])
    tasks = parse_tasks(args.tasks)
    overrides = _data_overrides(args.data)
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise SdftlabError(f"--data names task(s) {unknown} not in --tasks {','.join(tasks)}")
    missing = [t for t in tasks if t not in overrides]
    files = (
        dict(default_task_files(current_world(_home(args)).data_dir, missing)) if missing else {}
    )
    files.update(overrides)
    files = {t: files[t] for t in tasks}
    lineage = _lineage(args)
    print(f"evaluating {args.state} on {', '.join(tasks)} (generation: {engine.engine})")
    metrics = evaluate_state(
        lineage,
        args.state,
        files,
        with_demonstration=args.demo,
        limit=args.limit,
        record=not args.no_record,
        engine=engine,
    )
    print(metrics_table({args.state: metrics}))
    if args.json:
        print(json.dumps(metrics))
    return 0


def cmd_degrade(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config

    lineage = _lineage(args)
    if args.op == "sft":
        from sdftlab.degrade.sft import SFTConfig, run_sft

        overrides = _flag_overrides(args, "data", "steps", "rounds")
        cfg = load_config(SFTConfig, args.config, overrides, section="sft" if args.config else None)
        data_dir = _world_data_dir(args)
        run_sft(lineage, args.src, args.dst, cfg, data_dir=data_dir, overwrite=args.overwrite)
    elif args.op == "prune":
        from sdftlab.degrade.prune import PruneSpec, run_prune

        spec = load_config(PruneSpec, None, [
            f"ratio={args.ratio}", f"importance={args.importance}",
            f"multiple_of={args.multiple_of}", f"calibration={args.calibration}",
        ])  # fmt: skip
        meta = run_prune(lineage, args.src, args.dst, spec, data_dir=_world_data_dir(args),
                         overwrite=args.overwrite)  # fmt: skip
        print(json.dumps(meta.config))
    elif args.op == "quantize":
        from sdftlab.degrade.quantize import QuantizeSpec, quantize_state

        spec = load_config(QuantizeSpec, None, [
            f"quant_type={args.quant_type}", f"double_quant={not args.no_double_quant}",
            f"compute_dtype={args.compute_dtype}",
        ])  # fmt: skip
        meta = quantize_state(lineage, args.src, args.dst, overwrite=args.overwrite,
                              **spec.model_dump())  # fmt: skip
        print(json.dumps(meta.config))
    print(lineage.tree())
    return 0


def _world_data_dir(args: argparse.Namespace) -> Path | None:
    from sdftlab.world.build import current_world

    try:
        return current_world(_home(args)).data_dir
    except SdftlabError:
        return None


def cmd_recover(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import recover

    overrides = _flag_overrides(args, "teacher", "data", "steps")
    cfg = load_config(
        RecoverConfig, args.config, overrides, section="recover" if args.config else None
    )
    lineage = _lineage(args)
    data_dir = _world_data_dir(args)
    recover(lineage, args.student, args.dst, cfg, data_dir=data_dir, overwrite=args.overwrite)
    print(lineage.tree())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config
    from sdftlab.pipelines.graph import PipelineConfig, project_config, run_pipeline

    path = args.config or project_config("forgetting")
    cfg = load_config(PipelineConfig, path, args.overrides)
    run_pipeline(cfg, _lineage(args, cfg.lineage), _home(args))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Each training stage's memory per device and the devices it holds; status 2 when a
    stage cannot fit (the same check a pipeline makes before it starts)."""
    from sdftlab.config import load_config
    from sdftlab.pipelines.graph import PipelineConfig, built_data_dir, order
    from sdftlab.plan import check, plan_pipeline, table

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    home = _home(args)
    lineage = _lineage(args, cfg.lineage)
    plans = plan_pipeline(cfg, order(cfg.stages), lineage, built_data_dir(cfg, home))
    print(table(plans))
    check(plans, cfg.resources)
    print(f"{cfg.name}: every stage fits")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config
    from sdftlab.sweep import SweepConfig, run_sweep

    cfg = load_config(SweepConfig, args.config, args.overrides)
    out = run_sweep(cfg, _lineage(args, cfg.lineage), _world_data_dir(args))
    print(f"results: {out}")
    return 0


def cmd_cka(args: argparse.Namespace) -> int:
    from sdftlab.cka.run import run_cli
    from sdftlab.world.build import current_world

    try:
        data_dir = current_world(_home(args)).data_dir
    except SdftlabError:
        data_dir = None
    print(run_cli(args, _lineage(args), data_dir))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    lineage = _lineage(args)
    if args.action == "tree":
        print(lineage.tree())
    elif args.action == "list":
        for name in lineage.names():
            print(name)
    elif args.action == "show":
        if not args.name:
            raise SdftlabError("sdftlab lineage show NAME: give the state's name")
        from sdftlab.provenance import summary

        meta = lineage.meta(args.name)
        print(f"{meta.name}  <{meta.kind}>  made {meta.created_at}")
        print("\n".join(summary(meta.provenance)))
        print(meta.model_dump_json(indent=2))
    elif args.action == "verify":
        names = [args.name] if args.name else lineage.names()
        bad = 0
        for name in names:
            try:
                lineage.verify(name)
                print(f"ok   {name}")
            except SdftlabError as err:
                bad += 1
                print(f"BAD  {name}: {err}")
        print(f"{len(names) - bad} of {len(names)} states whole" if names else "no states")
        return 1 if bad else 0
    elif args.action == "rm":
        if not args.name:
            raise SdftlabError("sdftlab lineage rm NAME: give the state's name")
        lineage.delete(args.name)
        print(f"deleted {args.name}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from sdftlab import runs

    root = Path(args.dir)
    if args.action == "list":
        print(runs.list_table(root))
        return 0
    if len(args.runs) != 2:
        raise SdftlabError("sdftlab runs compare A B: give two runs (ids, <pipeline>/<id>, "
                           "<pipeline>/latest or paths; `sdftlab runs` lists them)")  # fmt: skip
    a, b = (runs.resolve_run(root, ref) for ref in args.runs)
    metrics = [m for m in (args.metrics or "").split(",") if m]
    frame = runs.compare(a, b, metrics)
    print(runs.compare_table(frame, f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdftlab", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", help="worlds and default lineage (default $SDFTLAB_HOME or ./.sdftlab)"
    )
    parser.add_argument("--lineage", help="lineage root: a path or a pyarrow.fs URI")
    sub = parser.add_subparsers(dest="command", required=True)
    _state_commands(sub)
    _degrade_command(sub)
    _run_commands(sub)
    return parser


def _state_commands(sub: Any) -> None:
    """The commands on single states: world, import, eval, recover, cka, lineage."""
    world = sub.add_parser("world", help="build or inspect the embedded tiny world")
    world.add_argument("action", choices=["build", "info"])
    world.add_argument("--config", help="a WorldConfig YAML file")
    world.add_argument("--overwrite", action="store_true", help="rebuild and replace `base`")
    world.add_argument("overrides", nargs="*", metavar="key=value")
    world.set_defaults(func=cmd_world)

    imp = sub.add_parser("import", help="bring a pretrained model into the lineage")
    imp.add_argument(
        "source", help="an HF model folder, a .gguf file, a hub id (org/name) or smollm2-135m"
    )
    imp.add_argument("--to", dest="dst", required=True, help="the new state's name")
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(func=cmd_import)

    ev = sub.add_parser("eval", help="evaluate a state and record its metrics")
    ev.add_argument("state", help="a lineage state name or a Hugging Face model directory")
    ev.add_argument("--tasks", default="science,tooluse,mmlu,winogrande")
    ev.add_argument(
        "--demo", action="store_true", help="also score with the demonstration in context"
    )
    ev.add_argument("--data", action="append", default=[], metavar="TASK=PATH")
    ev.add_argument("--limit", type=int, help="evaluate the first N rows of each task")
    ev.add_argument("--no-record", action="store_true", help="do not write metrics to the lineage")
    ev.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    ev.add_argument(
        "--engine", choices=["hf", "vllm"], default="hf", help="generate with transformers or vLLM"
    )
    ev.add_argument(
        "overrides", nargs="*", metavar="key=value", help="engine options, e.g. kv_cache_gb=2"
    )
    ev.set_defaults(func=cmd_eval)

    rec = sub.add_parser("recover", help="SDFT recovery of a state from a teacher")
    rec.add_argument("--student", required=True, help="the degraded state")
    rec.add_argument("--teacher", help="state name, model path, `ema` or `live` (default expert)")
    rec.add_argument("--to", dest="dst", required=True, help="the new state's name")
    rec.add_argument("--data", help="tasks (comma separated; world train split) or task=PATH")
    rec.add_argument("--steps", type=int)
    rec.add_argument("--config", help="a YAML file (its `recover:` section)")
    rec.add_argument("--overwrite", action="store_true")
    rec.add_argument("overrides", nargs="*", metavar="key=value", help="RecoverConfig overrides")
    rec.set_defaults(func=cmd_recover)

    from sdftlab.cka.run import add_cli_arguments

    cka = sub.add_parser("cka", help="per-layer CKA between two states on the same inputs")
    add_cli_arguments(cka)
    cka.set_defaults(func=cmd_cka)

    lin = sub.add_parser("lineage", help="show the model states as a tree")
    lin.add_argument(
        "action", nargs="?", default="tree", choices=["tree", "list", "show", "verify", "rm"]
    )
    lin.add_argument("name", nargs="?")
    lin.set_defaults(func=cmd_lineage)


def _degrade_command(sub: Any) -> None:
    deg = sub.add_parser("degrade", help="SFT (forgetting), NF4 quantization, FFN pruning")
    deg.add_argument("op", choices=["sft", "quantize", "prune"])
    deg.add_argument("--from", dest="src", required=True, help="the state to degrade")
    deg.add_argument("--to", dest="dst", required=True, help="the new state's name")
    deg.add_argument("--overwrite", action="store_true")
    deg.add_argument("--config", help="sft: a YAML file (its `sft:` section)")
    deg.add_argument("--data", help="sft: tasks (comma separated) or task=PATH")
    deg.add_argument("--steps", type=int, help="sft: optimizer steps per round")
    deg.add_argument("--rounds", type=int, help="sft: rounds (default one per data entry)")
    deg.add_argument("--ratio", type=float, default=0.1, help="prune: fraction of FFN neurons")
    deg.add_argument("--importance", choices=["magnitude", "taylor"], default="magnitude")
    deg.add_argument("--multiple-of", type=int, default=64, help="prune: round the new width")
    deg.add_argument(
        "--calibration", default="science", help="prune taylor: task (or task=PATH) to score on"
    )
    deg.add_argument("--quant-type", default="nf4", help="quantize: nf4 or fp4")
    deg.add_argument("--compute-dtype", default="float32", help="quantize: float32|bfloat16")
    deg.add_argument("--no-double-quant", action="store_true")
    deg.add_argument("overrides", nargs="*", metavar="key=value", help="sft config overrides")
    deg.set_defaults(func=cmd_degrade)


def _run_commands(sub: Any) -> None:
    """The commands on whole configs and their runs: demo, plan, sweep, runs."""
    demo = sub.add_parser("demo", help="the forgetting pipeline on the embedded tiny world")
    demo.add_argument("--config", help="a pipeline YAML (default: jobs/configs/forgetting.yaml)")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.set_defaults(func=cmd_demo)

    plan = sub.add_parser("plan", help="each stage's memory per device, before any work")
    plan.add_argument("config", help="a pipeline YAML (jobs/configs/*.yaml)")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.set_defaults(func=cmd_plan)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep: teacher × pruning ratio × lr (× loss)")
    sweep.add_argument("config", help="a SweepConfig YAML (jobs/configs/sweep_*.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    sweep.set_defaults(func=cmd_sweep)

    rn = sub.add_parser("runs", help="list pipeline runs, or compare two of them")
    rn.add_argument("action", nargs="?", default="list", choices=["list", "compare"])
    rn.add_argument("runs", nargs="*", metavar="RUN", help="compare: two run ids or paths")
    rn.add_argument("--dir", default="runs", help="where the pipelines' runs are (default runs)")
    rn.add_argument("--metrics", help="compare: only these metrics (comma separated)")
    rn.set_defaults(func=cmd_runs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tune_cpu_allocator()  # world builds, evaluation and CKA in this process reuse freed memory
        return int(args.func(args) or 0)
    except SdftlabError as err:
        print(f"sdftlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
