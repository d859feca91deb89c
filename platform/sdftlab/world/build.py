"""Build the tiny world: task data (JSONL), a local tokenizer, and the pretrained `base` state.

Everything is seeded by `WorldConfig.seed` and cached under `<home>/world/<config hash>/`:
a second build with the same config reuses it. The base model lands in the lineage as the
state `base` (kind `world`), the root of every pipeline.

    sdftlab world build                       # defaults: ≈ 5–6 min on 2 cores (cached)
    sdftlab world build pretrain.steps=400    # smaller, for a quick look
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdftlab.data.chat import off_path
from sdftlab.data.loaders import world_task_file, write_task_file
from sdftlab.errors import LineageError
from sdftlab.lineage import Lineage
from sdftlab.paths import atomic_write, sdftlab_home
from sdftlab.world import tasks
from sdftlab.world.config import PretrainConfig, WorldConfig
from sdftlab.world.model import (
    Batch,
    Doc,
    build_tiny_model,
    copy_accuracy,
    length_bucketed_batches,
    padded_batches,
    padding_free_batches,
    pretrain,
)
from sdftlab.world.tokenizer import train_tokenizer

TASK_FILES = ("science", "tooluse", "mmlu", "winogrande")
# Bumped whenever the generators change what a config produces, so that a world cached by an
# older version is rebuilt rather than reused (2: science reasoning checks the options;
# 3: tool names and numbers in the copy curriculum; Winogrande answers follow the animals;
# 4: half the replay rows are teacher-format rows of the shadow worlds; 5: off-path
# teacher-format answers as an option; 6: the padding-free copy phase as an option — both off,
# a build equals version 4's).
GENERATOR_VERSION = 6


def world_digest(cfg: WorldConfig) -> str:
    """The cache key of a world: its config and the generators' version."""
    return f"{cfg.stable_hash()[:14]}v{GENERATOR_VERSION}"


WORLD_META = "world.json"


@dataclass(frozen=True)
class World:
    """A built world on disk."""

    directory: Path
    config: WorldConfig

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def task_file(self, task: str, split: str) -> Path:
        return world_task_file(self.data_dir, task, split)


def current_world(home: Path | None = None) -> World:
    """The most recently built world under `home`."""
    home = home or sdftlab_home()
    pointer = home / "world" / "current"
    if not pointer.is_file():
        raise LineageError(f"no tiny world under {home}; run `sdftlab world build` first")
    directory = home / "world" / pointer.read_text().strip()
    meta = json.loads((directory / WORLD_META).read_text())
    return World(directory, WorldConfig.model_validate(meta["config"]))


def _dedupe_against(rows: list[dict], seen: set[str]) -> list[dict]:
    out = []
    for row in rows:
        key = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def world_shadows(cfg: WorldConfig, facts: tasks.WorldFacts) -> tuple[tasks.WorldFacts, ...]:
    """The world's shadow worlds: pretraining's teacher-format documents and the SFT replay
    use the same ones."""
    return tasks.shadow_worlds(cfg.seed + 7, 64, facts)


def generate_data(cfg: WorldConfig, out_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """All task splits, eval rows kept disjoint from train rows; written as JSONL."""
    facts = tasks.WorldFacts.generate(cfg.seed, cfg.n_compounds)
    rng = random.Random(cfg.seed + 1)
    makers: dict[str, Callable[[int], list[dict]]] = {
        "science": lambda n: tasks.science_rows(facts, n, rng),
        "tooluse": lambda n: tasks.tooluse_rows(facts, n, rng),
        "mmlu": lambda n: tasks.mmlu_rows(facts, n, rng),
        "winogrande": lambda n: tasks.winogrande_rows(n, rng),
    }
    data: dict[str, dict[str, list[dict]]] = {}
    for task in TASK_FILES:
        sizes = getattr(cfg, task)
        seen: set[str] = set()
        train = _dedupe_against(makers[task](sizes.train), seen)
        evaluation: list[dict] = []
        for _ in range(50):  # draw until enough unseen eval rows (bounded)
            evaluation += _dedupe_against(makers[task](sizes.eval), seen)
            if len(evaluation) >= sizes.eval:
                break
        data[task] = {"train": train, "eval": evaluation[: sizes.eval]}
        for split, rows in data[task].items():
            write_task_file(world_task_file(out_dir, task, split), rows)
    # Replay mixed into SFT batches: general chat, and the SDFT teacher format on shadow worlds.
    write_task_file(
        world_task_file(out_dir, "replay", "train"),
        replay_rows(facts, world_shadows(cfg, facts), cfg.replay_rows, rng),
    )
    return data


def build_world_data(cfg: WorldConfig, home: Path) -> Path:
    """The world's task files alone — no tokenizer, no model — for a pipeline on an imported
    model: facts no pretrained model knows, in the real tasks' formats. Cached under
    `<home>/world_data/<digest>` (the digest of `world_digest`), written atomically."""
    out = home / "world_data" / world_digest(cfg)
    if (out / "science_train.jsonl").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data-", dir=out.parent))
    try:
        generate_data(cfg, staging)
        os.replace(staging, out)
    except OSError:  # another process finished the same data first
        shutil.rmtree(staging, ignore_errors=True)
        if not (out / "science_train.jsonl").is_file():
            raise
    return out


def replay_rows(
    facts: tasks.WorldFacts,
    shadows: tuple[tasks.WorldFacts, ...],
    n: int,
    rng: random.Random,
) -> list[dict]:
    """Chat rows (`messages`, `response`) replayed during SFT so a state keeps its general skills.

    Half are the pretraining mixture's chat kinds (general questions, novel text shown as a
    demonstration). The other half are teacher-format rows of the shadow worlds: the SDFT
    teacher's exact messages, answered from the demonstration. Without them a task SFT
    unlearns the use of a demonstration, and the state it makes is no longer a teacher
    (docs/LOG.md: science with a demonstration 24% instead of 61%).
    """
    rows = []
    for i in range(n):
        if i % 2:
            *messages, answer = tasks.task_demo_chat(rng, shadows)
            rows.append({"messages": messages, "response": answer["content"]})
            continue
        make = tasks.demo_chat if rng.random() < 0.6 else tasks.general_chat
        user, response = make(rng, facts)
        system = rng.choice((None, "You are a helpful assistant .", tasks.SCIENCE_SYSTEM))
        messages = [{"role": "system", "content": system}] if system else []
        rows.append(
            {"messages": [*messages, {"role": "user", "content": user}], "response": response}
        )
    return rows


def _chat(tokenizer, user: str, assistant: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pretrain_documents(
    facts: tasks.WorldFacts,
    data: dict[str, dict[str, list[dict]]],
    seed: int,
    mixture: dict[str, float],
    shadows: tuple[tasks.WorldFacts, ...],
    copy_gap: int = 0,
    structured_frac: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """An endless seeded stream of (kind, text) pretraining documents drawn by `mixture` weight.

    Chat documents are JSON after a `chat:` (user, assistant) or `messages:` (full list) prefix
    and get the chat template when rendered.
    """
    rng = random.Random(seed)
    mmlu, wino = data["mmlu"]["train"], data["winogrande"]["train"]
    make = {
        "knowledge": lambda: " ".join(tasks.knowledge_statement(rng, facts) for _ in range(4)),
        "mmlu": lambda: tasks.mmlu_text(rng.choice(mmlu)),
        "winogrande": lambda: " ".join(tasks.winogrande_text(rng.choice(wino)) for _ in range(3)),
        "demo": lambda: "chat:" + json.dumps(tasks.demo_chat(rng, facts)),
        "task_demo": lambda: "messages:" + json.dumps(tasks.task_demo_chat(rng, shadows)),
        "chat": lambda: "chat:" + json.dumps(tasks.general_chat(rng, facts)),
        "copy": lambda: (
            tasks.structured_copy_document(rng)
            if rng.random() < structured_frac
            else tasks.copy_document(rng, max_gap=copy_gap)
        ),
    }
    kinds = [k for k, w in mixture.items() if w > 0]
    weights = [mixture[k] for k in kinds]
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield kind, make[kind]()


def _render(tokenizer, text: str, rng: random.Random) -> str:
    if text.startswith("messages:"):
        return tokenizer.apply_chat_template(json.loads(text[9:]), tokenize=False)
    if text.startswith("chat:"):
        user, assistant = json.loads(text[5:])
        system = rng.choice((None, None, "You are a helpful assistant .", tasks.SCIENCE_SYSTEM))
        return _chat(tokenizer, user, assistant, system)
    return text


def build_world(
    cfg: WorldConfig,
    lineage: Lineage,
    home: Path | None = None,
    *,
    name: str = "base",
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> World:
    """Build (or reuse) the world for `cfg` and make sure its model is state `name` (`base`
    by default) in `lineage`."""
    home = home or sdftlab_home()
    digest = world_digest(cfg)
    directory = home / "world" / digest
    if lineage.exists(name) and not overwrite:
        existing = lineage.meta(name).config.get("world_hash")
        if existing != digest:
            raise LineageError(
                f"lineage {lineage.root} already has a `{name}` from another world config "
                f"(hash {existing}, this one {digest}); use another --lineage, or --overwrite"
            )
    if (directory / WORLD_META).is_file() and not overwrite:
        twin = name if lineage.exists(name) else _world_state(lineage, digest)
        if twin:
            if twin != name:  # the same world's model under another name: copy, no pretraining
                meta = lineage.meta(twin)
                lineage.save_dir(name, lineage.local_path(twin), kind="world",
                                 config=meta.config, metrics=meta.metrics)  # fmt: skip
            log(
                f"world {digest}: cached at {directory}"
                + (f" (from `{twin}`)" if twin != name else "")
            )
            _point_current(home, digest)
            return World(directory, cfg)

    t0 = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=directory.parent))
    try:
        model, tokenizer, meta = _build_into(staging, cfg, digest, log)
        meta["build_seconds"] = round(time.perf_counter() - t0, 1)
        (staging / WORLD_META).write_text(json.dumps(meta, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    world = World(directory, cfg)
    lineage.save(
        name,
        model,
        tokenizer,
        kind="world",
        overwrite=overwrite or lineage.exists(name),
        config={"world_hash": digest, "world_dir": str(directory), "world": meta["config"]},
        metrics={
            "pretrain/loss": meta["pretrain_final_loss"],
            "pretrain/copy_acc": meta["copy_accuracy"],
        },
    )
    _point_current(home, digest)
    log(
        f"world {digest} built in {time.perf_counter() - t0:.0f}s; `{name}` saved to {lineage.root}"
    )
    return world


def _build_into(
    staging: Path, cfg: WorldConfig, digest: str, log: Callable[[str], None]
) -> tuple[Any, Any, dict[str, Any]]:
    """The world's three steps into `staging`: task data, tokenizer, pretrained model;
    (model, tokenizer, the world's metadata)."""
    log(f"[1/3] task data (seed {cfg.seed}) → {staging.parent / digest / 'data'}")
    data = generate_data(cfg, staging / "data")
    facts = tasks.WorldFacts.generate(cfg.seed, cfg.n_compounds)

    log(f"[2/3] tokenizer: byte-level BPE, vocab {cfg.vocab_size}")
    rng = random.Random(cfg.seed + 2)
    corpus = [_render_row(task, row) for task in data for row in data[task]["train"]]
    shadows = world_shadows(cfg, facts)
    stream = pretrain_documents(facts, data, cfg.seed + 3, cfg.pretrain.mixture, shadows)
    # The vocabulary comes from the world's natural text, not from the synthetic copy and
    # demonstration documents: rarer names then stay split into several tokens, as rare
    # words are in real text, and that is what lets in-context copying emerge early.
    natural = (text for kind, text in stream if kind not in ("copy", "demo", "task_demo"))
    corpus += [next(natural) for _ in range(3000)]
    corpus += [tasks.copy_document(rng, tasks.COMMON_WORDS) for _ in range(1000)]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)

    log(
        f"[3/3] pretrain tiny Qwen2 ({cfg.model.num_layers} layers, hidden "
        f"{cfg.model.hidden_size}) for {cfg.pretrain.steps} steps"
    )
    model = build_tiny_model(cfg.model, tokenizer, cfg.seed)
    log(f"  parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    batch_for_step = _curriculum(cfg, tokenizer, facts, data, shadows)
    probes = tasks.copy_accuracy_probe(random.Random(cfg.seed + 6))
    losses = pretrain(
        model,
        batch_for_step,
        cfg.pretrain,
        log=log,
        probe=lambda: copy_accuracy(model, tokenizer, probes),
    )
    meta = {
        "hash": digest,
        "config": cfg.model_dump(mode="json"),
        "rows": {t: {s: len(r) for s, r in splits.items()} for t, splits in data.items()},
        "pretrain_final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "copy_accuracy": copy_accuracy(model, tokenizer, probes),
    }
    return model, tokenizer, meta


def _world_state(lineage: Lineage, digest: str) -> str | None:
    """A state of `lineage` that is the pretrained model of world `digest`, if any."""
    for state in lineage.names():
        meta = lineage.meta(state)
        if meta.kind == "world" and meta.config.get("world_hash") == digest:
            return state
    return None


def _point_current(home: Path, digest: str) -> None:
    with atomic_write(home / "world" / "current") as fh:
        fh.write(digest)


def _render_row(task: str, row: dict) -> str:
    if task == "science":
        return (
            "\n".join(m["content"] for m in row["prompt"])
            + "\n"
            + "\n".join(row["golden_response"])
        )
    if task == "tooluse":
        return row["prompt"] + "\n" + "\n".join(row["golden_response"])
    if task == "mmlu":
        return tasks.mmlu_text(row)
    return tasks.winogrande_text(row)


def encode_document(
    tokenizer,
    text: str,
    rng: random.Random,
    eos: list[int],
    assistant_only: bool,
    noise: float = 0.0,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one document; teacher-format chats may train on the answer only,
    and their answers may be perturbed off the demonstration's path (`off_path`)."""
    ids = tokenizer(_render(tokenizer, text, rng))["input_ids"] + eos
    if not text.startswith("messages:") or not (assistant_only or noise > 0):
        return ids, ids
    messages = json.loads(text[9:])
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        return ids, ids
    answer, answer_labels = off_path(ids[n:-1], prompt_ids, len(tokenizer), noise, rng)
    ids = prompt_ids + answer + eos
    labels = ([-100] * n if assistant_only else list(prompt_ids)) + answer_labels + eos
    return ids, labels


def copy_curriculum_text(rng: random.Random, p: PretrainConfig) -> str:
    """One copy-curriculum document: an option lookup, a structured copy or a plain copy, at
    the config's shares."""
    r = rng.random()
    if r < p.copy_lookup_frac:
        return tasks.lookup_document(rng)
    if r < p.copy_lookup_frac + p.copy_structured_frac:
        return tasks.structured_copy_document(rng)
    return tasks.copy_document(rng)


def _curriculum(cfg: WorldConfig, tokenizer, facts, data, shadows) -> Callable[[int], Batch]:
    """Batches for each step: copy spans, then (optionally) teacher-format demonstrations only,
    then the full mixture — one document a row, rows of similar length batched together so
    little compute goes to padding."""
    p = cfg.pretrain
    eos = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    rng = random.Random(cfg.seed + 4)
    assistant_only = p.demo_loss == "assistant"
    noise = p.demo_off_path

    def copy_docs() -> Iterator[Doc]:
        while True:
            ids = tokenizer(copy_curriculum_text(rng, p))["input_ids"] + eos
            yield ids[: p.max_len], ids[: p.max_len]

    def docs(mixture: dict[str, float], seed: int) -> Iterator[Doc]:
        stream = pretrain_documents(
            facts, data, seed, mixture, shadows, p.copy_gap_words, p.copy_structured_frac
        )
        for _, text in stream:
            ids, labels = encode_document(tokenizer, text, rng, eos, assistant_only, noise)
            yield ids[: p.max_len], labels[: p.max_len]

    # Padded as drawn, or padding-free (the same documents and loss on half the tokens); not
    # bucketed by length: batches of only short or only long copies grow in-context copying
    # less evenly (docs/LOG.md).
    copy_batches = (
        padding_free_batches(copy_docs(), p.copy_batch_size, p.max_len, eos[0])
        if p.padding_free
        else padded_batches(copy_docs(), p.copy_batch_size, eos[0])
    )
    mix_batches = length_bucketed_batches(
        docs(p.mixture, cfg.seed + 5), p.batch_size, eos[0], random.Random(cfg.seed)
    )
    demo_batches = length_bucketed_batches(
        docs({"task_demo": 1.0}, cfg.seed + 8), p.batch_size, eos[0], random.Random(cfg.seed)
    )
    copy_end = int(p.copy_curriculum_frac * p.steps)
    demo_end = copy_end + int(p.demo_phase_frac * p.steps)

    def batch_for_step(step: int) -> Batch:
        if step < copy_end:
            return next(copy_batches)
        return next(demo_batches) if step < demo_end else next(mix_batches)

    return batch_for_step
