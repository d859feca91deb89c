"""Multi-round supervised fine-tuning on Ray Train: how the expert and the forgetting are made.

Each round is one `TorchTrainer` run (CPU workers with gloo here, GPU workers with NCCL on a
cluster — the same code; `num_workers > 1` is DDP, or FSDP2 with `memory.fsdp`, `sharding`;
the loss is the mean over every worker's tokens): full fine-tuning or LoRA (merged into
the saved state), loss on the assistant tokens only, optional replay of general chat data in
every batch (≈ 25% keeps a fine-tuned model able to use a demonstration in its prompt, which
is what makes it a usable SDFT teacher), Ray Train checkpoints (safetensors) every
`checkpoint_every` steps, resumed after a worker failure. A step runs in micro-batches with
the output layer and the cross-entropy chunked (`memory`, `specs.MemorySpec`). The rows are
tokenized once and kept in Ray's object store (`materialize`, Ray Train's advice for data
that fits in memory; `materialize=false` re-tokenizes each epoch). With `padding_free=true`
(TRL's option) each batch's rows are laid end to end with their own positions: the padded
batch's loss on fewer tokens. It is off by default because the tiny world's documented
figures were taken with padded batches, and another rounding is another draw of those
figures. With `demo_off_path` > 0, the rows answered from a demonstration in their prompt
(the teacher-format replay rows) are perturbed off the demonstration's path, as
`pretrain.demo_off_path` does in pretraining: stray tokens without loss and dropped tokens,
so the SDFT teacher learns to find its place again after a student's sample leaves the
demonstration (off by default). Every round lands in the lineage with its parent, config and
metrics. It is also the plain-SFT baseline recovery is compared against.

    sdftlab degrade sft --from base --to expert --data science --steps 300
    sdftlab degrade sft --from expert --to forgot --data tooluse
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from sdftlab.cka.live import live_cka_text, live_probe
from sdftlab.data.chat import ChatTokenizer, count_assistant_tokens, example_to_row
from sdftlab.data.loaders import iter_jsonl, load_task_file, task_source, world_task_file
from sdftlab.errors import ConfigError
from sdftlab.lineage import Lineage, StateMeta
from sdftlab.sharding import global_tokens, mean_over_workers, no_sync
from sdftlab.specs import LiveCKASpec, TrainSpec
from sdftlab.train.batches import (
    last_hidden,
    micro_batches,
    output_layer,
    pack_padded,
    shard_batches,
    trim_padding,
)
from sdftlab.train.loop import Parts, Phases, TrainJob, train_worker
from sdftlab.train.setup import autocast, prepare_for_training, with_lora
from sdftlab.train.trainer import fit_and_save, run_name


class SFTConfig(TrainSpec):
    """One SFT stage: `rounds` rounds, round i on `data[i % len(data)]`."""

    data: list[str] = Field(
        ["science"],
        min_length=1,
        description="one entry per round: task names (world train split), task=PATH, or a+b",
    )
    rounds: int | None = Field(None, gt=0, description="default: one round per data entry")
    steps: int = Field(300, gt=0, description="optimizer steps per round")
    batch_size: int = Field(32, gt=0, description="global batch (split across workers)")
    warmup_steps: int = Field(10, ge=0)
    max_len: int = Field(256, gt=8)
    padding_free: bool = Field(
        False, description="rows laid end to end, each kept to itself (TRL's padding_free)"
    )
    replay_frac: float = Field(0.25, ge=0, lt=1, description="share of replay rows in the data")
    materialize: bool = Field(
        True,
        description="tokenize once and keep the rows in Ray's object store for every epoch; "
        "false re-tokenizes each epoch, for data larger than the object store",
    )
    demo_off_path: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="rows answered from a demonstration in their prompt (the SDFT teacher's "
        "format): per answer token, the rate of a stray token (no loss) or a dropped one",
    )
    replay_data: str | None = Field(None, description="chat JSONL; default the world's replay")
    live_cka: LiveCKASpec = Field(
        LiveCKASpec(), description="CKA to the state the run starts from, while training"
    )
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(25, gt=0)

    @model_validator(mode="after")
    def _batch_splits(self) -> SFTConfig:
        self.check_splits("batch_size", self.batch_size)
        return self

    @property
    def n_rounds(self) -> int:
        return self.rounds or len(self.data)


def sft_rows(entry: str, cfg: SFTConfig, data_dir: Path | None) -> list[dict[str, str]]:
    """Task rows of one data entry plus replay rows at `cfg.replay_frac`, shuffled (seeded).

    An entry joins several sources with `+` (`science+tooluse`): their rows in one round.
    """
    import random

    rows = []
    for part in entry.split("+"):
        task, path = task_source(part, data_dir, "train")
        rows += [example_to_row(ex) for ex in load_task_file(path, task)]
    if cfg.replay_frac > 0:
        replay_path = Path(cfg.replay_data) if cfg.replay_data else None
        if replay_path is None and data_dir is not None:
            replay_path = world_task_file(data_dir, "replay", "train")
        if replay_path is None or not replay_path.is_file():
            raise ConfigError(
                f"replay_frac={cfg.replay_frac} but no replay data at {replay_path}; "
                "set replay_data=PATH (chat JSONL with messages/response) or replay_frac=0"
            )
        replay = [
            {"messages": json.dumps(r["messages"]), "response": r["response"]}
            for _, r in iter_jsonl(replay_path)
        ]
        rng = random.Random(cfg.seed)
        want = round(len(rows) * cfg.replay_frac / (1 - cfg.replay_frac))
        rows += [replay[rng.randrange(len(replay))] for _ in range(want)]
    random.Random(cfg.seed + 1).shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- worker


def sft_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: SFTConfig, device: torch.device
) -> float:
    """Forward and backward of one step's batch, `cfg.memory.micro_batch_size` rows at a time;
    returns the step's mean cross-entropy over assistant tokens (the gradients are its)."""
    from sdftlab.chunked import chunked_cross_entropy

    batch = pack_padded(batch) if cfg.padding_free else trim_padding(batch)
    # the step's tokens on every worker: the loss is the mean over all of them
    n_tokens = global_tokens(int((batch["labels"][:, 1:] != -100).sum()))
    head = output_layer(model)
    parts = micro_batches(len(batch["labels"]), cfg.memory.micro_batch_size)
    total = 0.0
    for i, rows in enumerate(parts):
        part = {k: v[rows] for k, v in batch.items()}
        if not cfg.padding_free:
            part = trim_padding(part)
        labels_BT = part.pop("labels")
        with no_sync(model, i == len(parts) - 1, cfg.memory.fsdp_accumulate):
            with autocast(device, cfg.memory.autocast_on(cfg.use_gpu, SFTMethod.cpu_autocast)):
                # position t predicts token t + 1; packed rows keep apart without a cache
                hidden_BTD, _ = last_hidden(model, **part)
                keep_BT = labels_BT[:, 1:] != -100
                loss = chunked_cross_entropy(
                    hidden_BTD[:, :-1][keep_BT],
                    head,
                    labels_BT[:, 1:][keep_BT],
                    n_tokens=n_tokens,
                    chunk_tokens=cfg.memory.chunk_for(head.weight.shape[0]),
                )
            loss.backward()
        total += float(loss.detach())
    return mean_over_workers(total)


class SFTMethod:
    """SFT for the one training loop (`train.loop.Method`): the state's model (fp32, + LoRA),
    the shard's batches, `sft_step`."""

    tag = "sft"
    cpu_autocast = True  # SFT's documented figures were taken under bf16 autocast

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.job, self.cfg, self.device = job, job.spec, device

    def build(self) -> Parts:
        from sdftlab.models import load_model, load_tokenizer

        model = load_model(self.job.init_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(self.job.init_dir)
        prepare_for_training(model, self.cfg.memory, self.device)
        model = with_lora(model, self.cfg.lora)
        return Parts(model, tokenizer, resident={self.job.init_dir: model})

    def begin(self, model: torch.nn.Module, start: int) -> None:
        cfg = self.cfg
        self.batches = shard_batches(cfg.batch_size, seed=cfg.seed, skip=start,
                                     shuffle_buffer=4 * cfg.batch_size, tensors=True)  # fmt: skip
        self.t0, self.tokens, self.losses = time.perf_counter(), 0, []

    def batch(self, step: int, phases: Phases) -> dict[str, torch.Tensor]:
        phases.start("data_s")
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        self.tokens += int(batch["attention_mask"].sum())
        return batch

    def step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
        return sft_step(model, batch, self.cfg, self.device)

    def after_step(self, bare: torch.nn.Module, rank: int) -> None:
        return None

    def metrics(self, done: int, batch: Any, loss: float, seconds: dict) -> dict[str, Any]:
        self.losses.append(loss)
        recent = self.losses[-self.cfg.log_every :]
        return {"loss": sum(recent) / len(recent),
                "tokens_per_s": self.tokens / (time.perf_counter() - self.t0)}  # fmt: skip

    def progress(self, m: dict[str, Any]) -> str:
        return (f"[sft] step {m['step']:4d}/{self.cfg.steps}  loss {m['loss']:.4f}"
                f"{live_cka_text(m)}  {m['tokens_per_s']:6.0f} tok/s  lr {m['lr']:.2e}  "
                f"peak {m['peak_rss_gb']:.1f}GB")  # fmt: skip


# ----------------------------------------------------------------------------- driver


def sft_dataset(rows: list[dict[str, str]], tokenizer_dir: str, cfg: SFTConfig) -> Any:
    """The Ray Dataset a round trains on: `rows` tokenized by `ChatTokenizer` actors into
    fixed-width arrays, materialized in the object store unless `cfg.materialize` is off."""
    import ray.data

    dataset = ray.data.from_items(rows).map_batches(
        ChatTokenizer,
        fn_constructor_kwargs={
            "tokenizer_dir": tokenizer_dir,
            "max_len": cfg.max_len,
            "demo_off_path": cfg.demo_off_path,
            "seed": cfg.seed,
        },
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,  # tokenizing is light; leave the CPUs to the train workers
    )
    # Materialized, every epoch reads the same blocks instead of re-running the tokenizer (a
    # new actor, its start-up, and CPU taken from the training step, each epoch).
    return dataset.materialize() if cfg.materialize else dataset


def run_sft(
    lineage: Lineage,
    src: str,
    dst: str,
    cfg: SFTConfig,
    *,
    data_dir: Path | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> StateMeta:
    """SFT `src` for `cfg.n_rounds` rounds; save each round (the last as `dst`); its meta.
    `callbacks`: Ray Train callbacks, given every round's reports."""
    from sdftlab.raycluster import ensure_ray

    # Validate everything before any work: names, parents, data, assistant tokens.
    names = [dst if r == cfg.n_rounds - 1 else f"{dst}-r{r + 1}" for r in range(cfg.n_rounds)]
    for name in names:  # one version warning, not one a round
        lineage.check_new(name, parents=[src], overwrite=overwrite, warn=name == names[0])
    tokenizer = lineage.load_tokenizer(src)
    round_rows = {}
    for entry in dict.fromkeys(cfg.data):  # the stage's own data first: its errors are its own
        rows = sft_rows(entry, cfg, data_dir)
        count_assistant_tokens(tokenizer, rows, cfg.max_len, f"data {entry!r}")
        round_rows[entry] = rows
    probe = live_probe(lineage, cfg.live_cka, reference=src, data=cfg.data[0], data_dir=data_dir)

    ensure_ray()
    parent = src
    meta: StateMeta | None = None
    for r, name in enumerate(names):
        entry = cfg.data[r % len(cfg.data)]
        log(
            f"SFT round {r + 1}/{cfg.n_rounds}: {parent} → {name} on {entry} "
            f"({len(round_rows[entry])} rows, {cfg.steps} steps)"
        )
        init_dir = str(lineage.resolve(parent))
        meta, final, seconds = fit_and_save(
            partial(train_worker, SFTMethod), TrainJob(cfg, init_dir, probe),
            run_name=run_name("sft", name, cfg, lineage.meta(parent).content_hash),
            datasets={"train": sft_dataset(round_rows[entry], init_dir, cfg)},
            callbacks=callbacks, lineage=lineage, name=name, kind="sft", parents=[parent],
            overwrite=overwrite,
            config={"sft": cfg.model_dump(mode="json"), "round": r + 1, "data": entry},
            metrics=lambda m, seconds: {
                "sft/loss": m["loss"], "sft/seconds": seconds,
                "sft/tokens_per_s": m["tokens_per_s"], "sft/peak_rss_gb": m["peak_rss_gb"],
            },
        )  # fmt: skip
        log(f"  saved {name}: loss {final['loss']:.3f}, {seconds:.0f}s")
        parent = name
    assert meta is not None
    return meta
