"""The `sdftlab` command.

    sdftlab world build [--config world.yaml] [key=value ...]   build the tiny world + `base`
    sdftlab world info                                           where the current world lives
    sdftlab import SOURCE --to NAME      an HF folder, a .gguf file, a hub id or smollm2-135m
    sdftlab eval STATE [--tasks science,tooluse,mmlu,winogrande] [--demo] [--data task=PATH]
                       [--engine vllm] [max_new_tokens=N kv_cache_gb=G ...]
    sdftlab degrade sft --from base --to expert --data science [--steps N] [key=value ...]
    sdftlab degrade quantize --from expert --to nf4
    sdftlab degrade prune --from expert --to pruned10 --ratio 0.1 [--importance taylor]
    sdftlab cka --state forgot --reference expert [--data science] [--actors 2] [--plot cka.png]
    sdftlab lineage [tree | list | show NAME | verify [NAME] | rm NAME]
                                 (show: provenance, then metadata; verify: sha256 + loads)
    sdftlab runs [--dir runs]                    every pipeline run with its headline metrics
    sdftlab runs compare A B [--metrics m,...]   per-state differences between two runs
    sdftlab plan CONFIG [key=value ...]   each stage's memory per device, before any work
    sdftlab demo | run CONFIG [key=value ...]   the forgetting pipeline | any pipeline config
    sdftlab sweep CONFIG [key=value ...]  a Ray Tune sweep
    sdftlab config show|validate [CONFIG] [--kind KIND] [key=value ...]   every field resolved

Global: `--home DIR` (worlds and the default lineage; `$SDFTLAB_HOME`, else `./.sdftlab`) and
`--lineage ROOT` (a path or a pyarrow.fs URI; `$SDFTLAB_LINEAGE`, else `<home>/lineage`).
User errors print one line naming the field and the fix, and exit with status 2. A command
that runs stages prints sdftlab's lines only; the libraries' go to a log file (sdftlab.console)
unless `--verbose`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sdftlab import __version__, console
from sdftlab.allocator import tune_cpu_allocator
from sdftlab.errors import SdftlabError


def _lineage(args: argparse.Namespace, from_config: str | None = None):
    """--lineage, else the experiment config's `lineage`, else $SDFTLAB_LINEAGE, else home
    (`paths.lineage_root`)."""
    from sdftlab.lineage import Lineage
    from sdftlab.paths import lineage_root

    return Lineage(lineage_root(args.lineage, from_config, _home(args)))


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


def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    """(the state read, the state written): --from / --to, else `from:` / `to:` at the top of
    the --config file."""
    from sdftlab.config import load_yaml

    given: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise SdftlabError(f"--config {path}: no such file")
        given = load_yaml(path.read_text()) or {}
    src = args.src or given.get("from") or given.get("student")
    dst = args.dst or given.get("to")
    for flag, value in (("--from", src), ("--to", dst)):
        if not value:
            raise SdftlabError(f"sdftlab {args.command}: give {flag} STATE (or `{flag[2:]}:` "
                               "at the top of the --config file)")  # fmt: skip
    return str(src), str(dst)


def cmd_degrade(args: argparse.Namespace) -> int:
    from sdftlab.config import load_config

    if args.op == "sft":
        from sdftlab.degrade.sft import SFTConfig, run_sft

        overrides = _flag_overrides(args, "data", "steps", "rounds")
        cfg = load_config(SFTConfig, args.config, overrides, section="sft" if args.config else None)
        src, dst = _endpoints(args)
        lineage = _lineage(args)
        data_dir = _world_data_dir(args)
        run_sft(lineage, src, dst, cfg, data_dir=data_dir, overwrite=args.overwrite)
    elif args.op == "prune":
        from sdftlab.degrade.prune import PruneSpec, run_prune

        overrides = _flag_overrides(args, "ratio", "importance", "multiple_of", "calibration")
        spec = load_config(PruneSpec, None, overrides)
        src, dst = _endpoints(args)
        lineage = _lineage(args)
        meta = run_prune(lineage, src, dst, spec, data_dir=_world_data_dir(args),
                         overwrite=args.overwrite)  # fmt: skip
        print(json.dumps(meta.config))
    else:
        from sdftlab.degrade.quantize import QuantizeSpec, quantize_state

        overrides = _flag_overrides(args, "quant_type", "compute_dtype")
        if args.no_double_quant:
            overrides.append("double_quant=false")
        spec = load_config(QuantizeSpec, None, overrides)
        src, dst = _endpoints(args)
        lineage = _lineage(args)
        meta = quantize_state(lineage, src, dst, overwrite=args.overwrite, **spec.model_dump())
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
    src, dst = _endpoints(args)
    lineage = _lineage(args)
    data_dir = _world_data_dir(args)
    recover(lineage, src, dst, cfg, data_dir=data_dir, overwrite=args.overwrite)
    print(lineage.tree())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`sdftlab run CONFIG` (any pipeline config) and `sdftlab demo` (the packaged
    forgetting pipeline by default)."""
    from sdftlab.config_files import packaged_config
    from sdftlab.pipelines.graph import run_pipeline

    cfg = _pipeline_config(args.config or packaged_config("forgetting"), args.overrides)
    run_pipeline(cfg, _lineage(args, cfg.lineage), _home(args))
    return 0


def _pipeline_config(path: str | Path, overrides: list[str]) -> Any:
    """The pipeline config at `path`, or one line saying which command a file of another
    kind (a sweep's, a world's) is for."""
    from sdftlab.config import load_config
    from sdftlab.config_files import kind_of_file
    from sdftlab.pipelines.graph import PipelineConfig

    path = Path(path)
    kind = kind_of_file(path)
    if kind != "pipeline":
        hint = {
            "sweep": f"sdftlab sweep {path}",
            "world": f"sdftlab world build --config {path}",
            "sft": "sdftlab degrade sft --config",
            "recover": "sdftlab recover --config",
        }
        raise SdftlabError(f"{path} is a {kind} config, not a pipeline's (it has no `stages`); "
                           f"use it with: {hint.get(kind, 'its own command')}")  # fmt: skip
    return load_config(PipelineConfig, path, overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """`sdftlab config show|validate [CONFIG] [--kind K] [key=value ...]`."""
    from sdftlab.config_files import load_any, show

    kind, cfg = load_any(args.config, args.kind, args.overrides)
    if args.action == "validate":
        print(f"{args.config or '(defaults)'}: a valid {kind} config")
    else:
        print(show(cfg, title=f"{args.config or '(defaults)'} — {kind} config"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Each training stage's memory per device and the devices it holds; status 2 when a
    stage cannot fit (the same check a pipeline makes before it starts)."""
    from sdftlab.pipelines.graph import built_data_dir, order
    from sdftlab.plan import check, plan_pipeline, table

    cfg = _pipeline_config(args.config, args.overrides)
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


EXAMPLES = """examples:
  sdftlab demo                                   the forgetting pipeline on the tiny world
  sdftlab run jobs/configs/compression.yaml      any pipeline config
  sdftlab config show jobs/configs/forgetting.yaml stages.expert.steps=100
  sdftlab degrade sft --from base --to expert --data science steps=300 lr=1e-3
  sdftlab recover --from forgot --teacher expert --to rec_expert --data science
  sdftlab eval rec_expert --tasks science,tooluse --engine vllm dtype=bfloat16
  sdftlab cka --state forgot --reference expert --data science
  sdftlab lineage show expert
  sdftlab runs compare forgetting/latest forgetting/20261207-091502-3fa9c1

Every command that takes a config takes key=value overrides anywhere on its line; a bad value
is one error naming the key and the fix (exit status 2). Docs: README.md, docs/."""


def _sub(
    sub: Any, name: str, help: str, example: str, func: Any, runs: bool = False
) -> argparse.ArgumentParser:
    """A subcommand with its help line and an example; one that `runs` work is quiet unless
    --verbose (sdftlab.console)."""
    parser = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.set_defaults(func=func)
    if runs:
        parser.add_argument("--verbose", action="store_true",
                            help="show the libraries' output here (else: in the log file named "
                            "on the first line)")  # fmt: skip
    return parser


def _overrides(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=what)


def _state_flags(parser: argparse.ArgumentParser, source: str, *old: str) -> None:
    """--from (the state read; `old` names kept as aliases) and --to (the state written)."""
    parser.add_argument("--from", *old, dest="src", help=f"{source} (or `from:` in --config)")
    parser.add_argument("--to", dest="dst", help="the new state's name (or `to:` in --config)")
    parser.add_argument("--overwrite", action="store_true", help="replace a state of that name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdftlab",
        description="Degrade a language model, recover it with self-distillation (SDFT), and "
        "measure why with CKA — on Ray, a laptop or a cluster.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdftlab {__version__}")
    parser.add_argument(
        "--home", help="worlds and default lineage (default $SDFTLAB_HOME or ./.sdftlab)"
    )
    parser.add_argument("--lineage", help="lineage root: a path or a pyarrow.fs URI")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _state_commands(sub)
    _degrade_command(sub)
    _run_commands(sub)
    return parser


def _state_commands(sub: Any) -> None:
    """The commands on single states: world, import, eval, recover, cka, lineage."""
    world = _sub(sub, "world", "build or inspect the embedded tiny world",
                 "sdftlab world build --config jobs/configs/world.yaml seed=1",
                 cmd_world, runs=True)  # fmt: skip
    world.add_argument("action", choices=["build", "info"])
    world.add_argument("--config", help="a WorldConfig YAML file")
    world.add_argument("--overwrite", action="store_true", help="rebuild and replace `base`")
    _overrides(world, "WorldConfig fields (`sdftlab config show jobs/configs/world.yaml`)")

    imp = _sub(sub, "import", "bring a pretrained model into the lineage",
               "sdftlab import smollm2-135m --to base", cmd_import)  # fmt: skip
    imp.add_argument(
        "source", help="an HF model folder, a .gguf file, a hub id (org/name) or smollm2-135m"
    )
    imp.add_argument("--to", dest="dst", required=True, help="the new state's name")
    imp.add_argument("--overwrite", action="store_true")

    from sdftlab.evaluate.run import ALL_TASKS

    ev = _sub(sub, "eval", "evaluate a state and record its metrics",
              "sdftlab eval expert --tasks science,tooluse --demo --limit 100",
              cmd_eval, runs=True)  # fmt: skip
    ev.add_argument("state", help="a lineage state name or a Hugging Face model directory")
    ev.add_argument("--tasks", default="science,tooluse,mmlu,winogrande",
                    help=f"comma separated, of: {', '.join(ALL_TASKS)}")  # fmt: skip
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
    _overrides(ev, "engine options (EvalEngineSpec), e.g. dtype=bfloat16 kv_cache_gb=2")

    rec = _sub(sub, "recover", "SDFT recovery of a state from a teacher",
               "sdftlab recover --from forgot --teacher expert --to rec_expert steps=100",
               cmd_recover, runs=True)  # fmt: skip
    _state_flags(rec, "the degraded state (the student)", "--student")
    rec.add_argument("--teacher", help="state name, model path, `ema` or `live` (default expert)")
    rec.add_argument("--data", help="tasks (comma separated; world train split) or task=PATH")
    rec.add_argument("--steps", type=int, help="optimizer steps")
    rec.add_argument("--config", help="a YAML file: its `recover:` section (+ `from:`, `to:`)")
    _overrides(rec, "RecoverConfig fields (`sdftlab config show --kind recover`)")

    from sdftlab.cka.run import add_cli_arguments

    cka = _sub(sub, "cka", "per-layer CKA between two states on the same inputs",
               "sdftlab cka --state forgot --reference expert --data science --actors 2",
               cmd_cka, runs=True)  # fmt: skip
    add_cli_arguments(cka)

    lin = _sub(sub, "lineage", "the model states: tree, list, show, verify, rm",
               "sdftlab lineage verify", cmd_lineage)  # fmt: skip
    lin.add_argument(
        "action", nargs="?", default="tree", choices=["tree", "list", "show", "verify", "rm"]
    )
    lin.add_argument("name", nargs="?")


def _degrade_command(sub: Any) -> None:
    deg = _sub(sub, "degrade", "SFT (forgetting), NF4 quantization, FFN pruning",
               "sdftlab degrade sft --from base --to expert --data science",
               cmd_degrade)  # fmt: skip
    ops = deg.add_subparsers(dest="op", required=True, metavar="OP")
    sft = _sub(ops, "sft", "multi-round SFT on Ray Train (full or LoRA, replay)",
               "sdftlab degrade sft --from expert --to forgot --data tooluse lr=1e-3",
               cmd_degrade, runs=True)  # fmt: skip
    _state_flags(sft, "the state fine-tuned")
    sft.add_argument("--config", help="a YAML file: its `sft:` section (+ `from:`, `to:`)")
    sft.add_argument("--data", help="tasks (comma separated) or task=PATH")
    sft.add_argument("--steps", type=int, help="optimizer steps per round")
    sft.add_argument("--rounds", type=int, help="rounds (default one per data entry)")
    _overrides(sft, "SFTConfig fields (`sdftlab config show --kind sft`)")

    prune = _sub(ops, "prune", "structured FFN pruning, loadable by from_pretrained and vLLM",
                 "sdftlab degrade prune --from expert --to pruned10 --ratio 0.1 "
                 "calibration_rows=32", cmd_degrade, runs=True)  # fmt: skip
    _state_flags(prune, "the state pruned")
    prune.add_argument("--ratio", type=float, help="fraction of FFN neurons (default 0.1)")
    prune.add_argument("--importance", choices=["magnitude", "taylor"])
    prune.add_argument("--multiple-of", type=int, help="round the new width (default 64)")
    prune.add_argument("--calibration", help="taylor: task (or task=PATH) to score on")
    _overrides(prune, "PruneSpec fields (`sdftlab config show --kind prune`)")

    quant = _sub(ops, "quantize", "4-bit NF4 (or FP4) with bitsandbytes, trainable with QLoRA",
                 "sdftlab degrade quantize --from expert --to nf4", cmd_degrade,
                 runs=True)  # fmt: skip
    _state_flags(quant, "the state quantized")
    quant.add_argument("--quant-type", choices=["nf4", "fp4"])
    quant.add_argument("--compute-dtype", choices=["float32", "bfloat16"])
    quant.add_argument("--no-double-quant", action="store_true")
    _overrides(quant, "QuantizeSpec fields (`sdftlab config show --kind quantize`)")


def _run_commands(sub: Any) -> None:
    """The commands on whole configs and their runs: demo, run, config, plan, sweep, runs."""
    demo = _sub(sub, "demo", "the forgetting pipeline on the embedded tiny world",
                "sdftlab demo stages.rec_base=null", cmd_run, runs=True)  # fmt: skip
    demo.add_argument("--config", help="a pipeline YAML (default: the packaged forgetting.yaml)")
    _overrides(demo, "pipeline overrides, e.g. stages.expert.steps=100")

    run = _sub(sub, "run", "run a pipeline config: forgetting, compression, small-model",
               "sdftlab run jobs/configs/compression.yaml eval.limit=50", cmd_run,
               runs=True)  # fmt: skip
    run.add_argument("config", help="a pipeline YAML (jobs/configs/*.yaml)")
    _overrides(run, "pipeline overrides, e.g. stages.expert.steps=100")

    cfg = _sub(sub, "config", "show a config resolved (every field: value, default, meaning), "
               "or validate it", "sdftlab config show jobs/configs/forgetting.yaml",
               cmd_config)  # fmt: skip
    cfg.add_argument("action", choices=["show", "validate"])
    cfg.add_argument("config", nargs="?", help="a YAML file (pipeline, sweep, world, …)")
    cfg.add_argument(
        "--kind",
        help="what the file (or the defaults) configure: pipeline, sweep, world, sft, recover, "
        "prune, quantize (default: from its keys)",
    )
    _overrides(cfg, "overrides applied before showing")

    plan = _sub(sub, "plan", "each stage's memory per device, before any work",
                "sdftlab plan jobs/configs/forgetting_qwen7b.yaml", cmd_plan)  # fmt: skip
    plan.add_argument("config", help="a pipeline YAML (jobs/configs/*.yaml)")
    _overrides(plan, "pipeline overrides")

    sweep = _sub(sub, "sweep", "Ray Tune sweep: teacher × pruning ratio × lr (× loss)",
                 "sdftlab sweep jobs/configs/sweep_teacher_lr.yaml", cmd_sweep,
                 runs=True)  # fmt: skip
    sweep.add_argument("config", help="a SweepConfig YAML (jobs/configs/sweep_*.yaml)")
    _overrides(sweep, "sweep overrides")

    rn = _sub(sub, "runs", "list pipeline runs, or compare two of them",
              "sdftlab runs compare forgetting/latest forgetting/20261207-091502-3fa9c1",
              cmd_runs)  # fmt: skip
    rn.add_argument("action", nargs="?", default="list", choices=["list", "compare"])
    rn.add_argument("runs", nargs="*", metavar="RUN", help="compare: two run ids or paths")
    rn.add_argument("--dir", default="runs", help="where the pipelines' runs are (default runs)")
    rn.add_argument("--metrics", help="compare: only these metrics (comma separated)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, `key=value` overrides anywhere on it: after the positional arguments,
    between options, or before them (argparse alone takes them in one place only)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    loose = [x for x in extra if "=" in x and not x.startswith("-")]
    unknown = [x for x in extra if x not in loose]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if loose:
        if not hasattr(args, "overrides"):
            parser.error(f"sdftlab {args.command} takes no key=value: {' '.join(loose)}")
        args.overrides = [*args.overrides, *loose]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = " ".join(x for x in (args.command, getattr(args, "op", None)) if x)
    try:
        with console.session(_home(args), command, getattr(args, "verbose", True)):
            tune_cpu_allocator()  # world builds, evaluation and CKA here reuse freed memory
            return int(args.func(args) or 0)
    except SdftlabError as err:
        console.error(str(err))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
