"""One training loop for every training stage (SFT, SDFT, off-policy distillation).

A stage is a *method* — its model, its batches and its step — run by one loop that owns the
rest, in a fixed lifecycle (as torchtune's recipes follow theirs):

1. set up: threads, seed, the method's model (+ LoRA) and teacher, the CPU allocator, the
   live CKA probe (`cka.live`);
2. resume: the trained weights and the teacher's (an EMA average) from the last checkpoint,
   before the model is sharded; the optimizer's state after;
3. train: warm-up + cosine learning rate, the method's step (its batch, forward and backward
   in micro-batches), gradient clipping, AdamW, what follows the step (the teacher's update,
   the weights pushed to the rollout engines), live CKA when due;
4. report and checkpoint every `log_every` / `checkpoint_every` steps (and kill points for
   the fault drills); the last checkpoint holds the final state;
5. the driver saves that state in the lineage (`fit_and_save`).

| module | holds |
|---|---|
| `loop` | the loop (`train_worker`), the `Method` protocol, the job, phase timings |
| `setup` | precision (bf16 autocast), attention kernel, allocator, activation checkpointing, LoRA |
| `batches` | micro-batches, padding trimmed or packed away, epochs, the last hidden states |
| `checkpoint` | safetensors checkpoints (weights, optimizer, step, live CKA) and resuming |
| `trainer` | the `TorchTrainer` every stage uses, its run name, report logs, `fit_and_save` |

The fields every stage shares are `specs.TrainSpec`; `degrade.sft.SFTMethod` and
`distill.sdft.SDFTMethod` are the methods.
"""
