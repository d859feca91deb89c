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
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from sdftlab import sharding
from sdftlab.cka.live import due, live_cka_text
from sdftlab.config import StrictModel
from sdftlab.data.chat import ChatTokenizer, count_assistant_tokens, example_to_row
from sdftlab.data.loaders import iter_jsonl, load_task_file, task_source, world_task_file
from sdftlab.errors import ConfigError
from sdftlab.lineage import Lineage, StateMeta
from sdftlab.sharding import global_tokens, mean_over_workers
from sdftlab.specs import LiveCKASpec, LoraSpec, MemorySpec


class SFTConfig(StrictModel):
    """One SFT stage: `rounds` rounds, round i on `data[i % len(data)]`."""

    data: list[str] = Field(
        ["science"],
        min_length=1,
        description="one entry per round: task names (world train split), task=PATH, or a+b",
    )
    rounds: int | None = Field(None, gt=0, description="default: one round per data entry")
    steps: int = Field(300, gt=0, description="optimizer steps per round")
    batch_size: int = Field(32, gt=0, description="global batch (split across workers)")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
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
    lora: LoraSpec | None = None
    memory: MemorySpec = MemorySpec()
    live_cka: LiveCKASpec = Field(
        LiveCKASpec(), description="CKA to the state the run starts from, while training"
    )
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int = Field(2, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(25, gt=0)
    max_failures: int = Field(1, ge=-1)
    seed: int = 0

    @model_validator(mode="after")
    def _batch_splits(self) -> SFTConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size={self.batch_size} does not split over num_workers="
                f"{self.num_workers}; make batch_size a multiple of num_workers"
            )
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
    from sdftlab import train_utils as tu
    from sdftlab.chunked import chunked_cross_entropy

    batch = tu.pack_padded(batch) if cfg.padding_free else tu.trim_padding(batch)
    # the step's tokens on every worker: the loss is the mean over all of them
    n_tokens = global_tokens(int((batch["labels"][:, 1:] != -100).sum()))
    head = tu.output_layer(model)
    parts = tu.micro_batches(len(batch["labels"]), cfg.memory.micro_batch_size)
    total = 0.0
    for i, rows in enumerate(parts):
        part = {k: v[rows] for k, v in batch.items()}
        if not cfg.padding_free:
            part = tu.trim_padding(part)
        labels_BT = part.pop("labels")
        with tu.no_sync(model, sync=i == len(parts) - 1):
            with tu.autocast(device, cfg.memory.autocast_on(cfg.use_gpu, cpu_default=True)):
                # position t predicts token t + 1; packed rows keep apart without a cache
                hidden_BTD, _ = tu.last_hidden(model, **part)
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


def sft_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the SFT loop with checkpoints and resume."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdftlab import train_utils as tu

    cfg = SFTConfig.model_validate(config["sft"])
    tu.ray_train_logs_to_files()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(
        config["init_dir"], use_safetensors=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(config["init_dir"])
    device = ray.train.torch.get_device()
    tu.use_cpu_allocator(cfg.memory, model, device)  # the same arithmetic either way
    tu.use_training_attention(model, device)
    if cfg.memory.gradient_checkpointing:
        tu.enable_checkpointing(model)
    model = tu.with_lora(model, cfg.lora)
    live = tu.live_cka(config["live_cka"], tokenizer, device, {config["init_dir"]: model},
                       everywhere=cfg.memory.fsdp)  # fmt: skip
    start, live_history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # the trained weights, before the model is sharded
        with checkpoint.as_directory() as d:
            tu.load_parameters(model, Path(d) / "trainable.safetensors")
    bf16 = cfg.memory.autocast_on(cfg.use_gpu, cpu_default=True)
    model = sharding.prepare(model, cfg.memory.fsdp, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tu.load_optimizer(model, optimizer, Path(d))
            start, live_history = tu.read_train_state(Path(d))["step"], tu.read_live_cka(Path(d))
    rank, size = sharding.world()
    shard = ray.train.get_dataset_shard("train")  # every worker reads every row, in order
    batches = tu.cycle_epochs(
        lambda: shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed,
        ),
        skip=start,  # a resumed run goes on with the batches it had not trained on
    )
    model.train()
    t0, tokens, losses = time.perf_counter(), 0, []
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = tu.warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        batch = {k: v.to(device) for k, v in sharding.rank_rows(next(batches), rank, size).items()}
        tokens += int(batch["attention_mask"].sum())
        optimizer.zero_grad(set_to_none=True)
        losses.append(sft_step(model, batch, cfg, device))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        metrics = {
            "step": done,
            "loss": sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]),
            "tokens_per_s": tokens / (time.perf_counter() - t0),
            "lr": optimizer.param_groups[0]["lr"],
            "peak_rss_gb": tu.peak_rss_gb(),
        }
        measure = due(cfg.live_cka.every, done, cfg.steps)  # asked on every rank
        if measure and live is not None:
            cka = live.measure(tu.unwrap(model))
            metrics |= cka
            live_history.append({"step": done, **cka})
        if rank == 0 and (done % cfg.log_every == 0 or done in (start + 1, cfg.steps)):
            print(
                f"[sft] step {done:4d}/{cfg.steps}  loss {metrics['loss']:.4f}"
                f"{live_cka_text(metrics)}  {metrics['tokens_per_s']:6.0f} tok/s  "
                f"lr {metrics['lr']:.2e}  "
                f"peak {metrics['peak_rss_gb']:.1f}GB",
                flush=True,
            )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                wrote = tu.save_checkpoint(
                    model, tokenizer, optimizer, Path(d), done,
                    final=done == cfg.steps, live_cka=live_history,
                )  # fmt: skip
                checkpoint = ray.train.Checkpoint.from_directory(d) if wrote else None
                ray.train.report(metrics, checkpoint=checkpoint)
        elif done % cfg.log_every == 0 or measure:
            ray.train.report(metrics)
        tu.kill_point(done)


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
    from sdftlab import train_utils as tu
    from sdftlab.raycluster import ensure_ray

    # Validate everything before any work: names, parents, data, assistant tokens.
    names = [dst if r == cfg.n_rounds - 1 else f"{dst}-r{r + 1}" for r in range(cfg.n_rounds)]
    for name in names:  # one version warning, not one a round
        lineage.check_new(name, parents=[src], overwrite=overwrite, warn=name == names[0])
    tokenizer = lineage.load_tokenizer(src)
    probe = tu.live_cka_probe(
        lineage, cfg.live_cka, reference=src, data=cfg.data[0], data_dir=data_dir
    )
    round_rows = {}
    for entry in dict.fromkeys(cfg.data):
        rows = sft_rows(entry, cfg, data_dir)
        count_assistant_tokens(tokenizer, rows, cfg.max_len, f"data {entry!r}")
        round_rows[entry] = rows

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
        dataset = sft_dataset(round_rows[entry], init_dir, cfg)
        trainer = tu.make_trainer(
            sft_worker_loop,
            {"sft": cfg.model_dump(mode="json"), "init_dir": init_dir, "live_cka": probe},
            run_name=tu.run_name("sft", name, cfg, lineage.meta(parent).content_hash),
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            cpus_per_worker=cfg.cpus_per_worker,
            max_failures=cfg.max_failures,
            datasets={"train": dataset},
            callbacks=callbacks,
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"SFT round {r + 1} finished without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as d:
            meta = lineage.save_dir(
                name,
                Path(d) / "model",
                kind="sft",
                parents=[parent],
                overwrite=overwrite,
                config={"sft": cfg.model_dump(mode="json"), "round": r + 1, "data": entry},
                metrics={
                    "sft/loss": result.metrics["loss"],
                    "sft/seconds": seconds,
                    "sft/tokens_per_s": result.metrics["tokens_per_s"],
                    "sft/peak_rss_gb": result.metrics["peak_rss_gb"],
                    **tu.live_cka_metrics(result.metrics),
                },
            )
        log(f"  saved {name}: loss {result.metrics['loss']:.3f}, {seconds:.0f}s")
        parent = name
    assert meta is not None
    return meta
