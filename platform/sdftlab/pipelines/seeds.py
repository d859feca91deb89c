"""A pipeline's stages once per seed: `seeds: [0, 1, 2]` in a pipeline config.

Every training stage (`sft`, `sdft`: the stages with a `seed`) runs once per seed, with that
seed, as state `<name>.s<seed>`; a stage that reads a seeded state (a recovery of `forgot`,
a pruning of `expert`, ...) is seeded with it, reading the same seed's states, teacher
included. Stages upstream of every training stage (the world, an import) are made once and
shared. Nothing of one seed overwrites another's, and a seed already done is skipped like any
finished stage, so adding a seed to a finished study runs that seed alone.

    seeds: [0, 1, 2]
    stages:
      base:   {kind: world}                                # base
      expert: {kind: sft, from: base, ...}                 # expert.s0, expert.s1, expert.s2
      forgot: {kind: sft, from: expert, ...}               # forgot.s0 from expert.s0, ...
      rec:    {kind: sdft, from: forgot, teacher: expert}  # rec.s1: forgot.s1 → teacher expert.s1

Evaluation scores every state; CKA compares each state with its own seed's reference (a
shared state, with the first seed's); the report gives each stage's figures over its seeds
(`report.write_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdftlab.pipelines.stages import kind_of


def seeded_name(name: str, seed: int) -> str:
    return f"{name}.s{seed}"


@dataclass(frozen=True)
class Seeded:
    """The stages a run makes (state name → stage) and which config stage and seed each is."""

    stages: dict[str, Any]
    stage_of: dict[str, str]  # state → the config's stage name
    seed_of: dict[str, int | None]  # state → its seed (None: made once, shared)
    seeds: tuple[int, ...]  # () without `seeds:`

    @classmethod
    def of(cls, stages: dict[str, Any]) -> Seeded:
        """No seeds: each stage makes its own one state."""
        return cls(dict(stages), {n: n for n in stages}, dict.fromkeys(stages), ())

    def state(self, stage: str, seed: int | None) -> str:
        """The state `stage` makes for `seed` (the shared one if the stage is not seeded)."""
        if seed is not None and seeded_name(stage, seed) in self.stages:
            return seeded_name(stage, seed)
        return stage

    def states_of(self, stage: str) -> list[str]:
        return [s for s, of in self.stage_of.items() if of == stage]

    def reference_of(self, state: str, reference: str) -> str:
        """The state `state` is compared with: its own seed's `reference`, or the first
        seed's for a shared state."""
        seed = self.seed_of[state]
        if seed is None and self.seeds:
            seed = self.seeds[0]
        return self.state(reference, seed)

    def seed_states(self, seed: int | None) -> list[str]:
        """The states of one seed, shared ones included, in run order."""
        return [s for s in self.stages if self.seed_of[s] in (None, seed)]


def _trains(stage: Any) -> bool:
    return stage.kind in ("sft", "sdft")


def expand(stages: dict[str, Any], in_order: list[str], seeds: list[int] | None) -> Seeded:
    """`stages` (in dependency order `in_order`) once per seed where they train or read a
    seeded state; the identity without seeds."""
    if not seeds:
        return Seeded.of({n: stages[n] for n in in_order})
    seeded: set[str] = set()
    for name in in_order:
        reads = kind_of(stages[name]).reads(stages[name])
        if _trains(stages[name]) or any(r in seeded for r in reads):
            seeded.add(name)
    out: dict[str, Any] = {}
    stage_of: dict[str, str] = {}
    seed_of: dict[str, int | None] = {}
    for name in in_order:
        stage = stages[name]
        if name not in seeded:
            out[name], stage_of[name], seed_of[name] = stage, name, None
            continue
        for seed in seeds:
            state = seeded_name(name, seed)
            if state in stages:
                raise ValueError(f"stage {state!r} is named as stage {name!r}'s state for seed "
                                 f"{seed}; rename it")  # fmt: skip
            out[state] = _for_seed(stage, seed, seeded)
            stage_of[state], seed_of[state] = name, seed
    return Seeded(out, stage_of, seed_of, tuple(seeds))


def _for_seed(stage: Any, seed: int, seeded: set[str]) -> Any:
    """The stage with `seed` (a training stage) reading the seed's copies of seeded states."""
    data = stage.model_dump(by_alias=True)
    if _trains(stage):
        data["seed"] = seed
    for key in ("from", "teacher"):
        if isinstance(data.get(key), str) and data[key] in seeded:
            data[key] = seeded_name(data[key], seed)
    return type(stage).model_validate(data)
