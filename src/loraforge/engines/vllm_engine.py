"""The vLLM engine: one engine serving the base and every adapter through LoRA requests.

Everything vLLM is asked for is built here as plain data first (engine arguments, sampling
parameters, one LoRA request per adapter), so it is tested without vLLM; `VllmEngine` only
hands that data to `vllm.LLM`. vLLM sizes its LoRA slots from `max_lora_rank`, which must be
one of `MAX_LORA_RANKS` (the rank rounded up), and `max_loras` (every adapter resident at once,
so one `generate` call interleaves all of them).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from loraforge.adapters import Adapter
from loraforge.engines import GREEDY, Decoding, Finish, Generation, OnBatch
from loraforge.errors import PermanentError
from loraforge.gsm8k import STOP_STRINGS, cut_at_stop

log = logging.getLogger("loraforge.engines.vllm")

# vLLM's accepted `max_lora_rank` values (vllm/config LoRAConfig).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
REQUESTS_PER_CALL = 1024  # requests per `generate` call: progress lines between calls


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (4 -> 8, 48 -> 64, 300 -> 320)."""
    for allowed in MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise PermanentError(
        f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({MAX_LORA_RANKS[-1]}): "
        "set LORAFORGE_ENGINE=transformers"
    )


def engine_args(
    model_path: str,
    revision: str | None,
    adapters: Sequence[Adapter],
    dtype: torch.dtype,
    seed: int,
    gpu_memory_utilization: float,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for this base and these adapters."""
    args: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "revision": revision,
        "dtype": _DTYPES.get(dtype, "auto"),
        "seed": seed,
        "trust_remote_code": False,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_prefix_caching": True,  # few-shot prompts share long prefixes
    }
    loras = [a for a in adapters if not a.is_base]
    if loras:
        args |= {
            "enable_lora": True,
            "max_lora_rank": round_lora_rank(max(a.max_rank for a in loras)),
            "max_loras": len(loras),
        }
    return args


def lora_requests(adapters: Sequence[Adapter]) -> dict[str, tuple[str, int, str] | None]:
    """label -> (lora_name, lora_int_id, lora_path) of vLLM's LoRARequest; None for `base`.

    Ids start at 1: vLLM reserves 0 for no adapter.
    """
    requests: dict[str, tuple[str, int, str] | None] = {}
    next_id = 1
    for adapter in adapters:
        if adapter.is_base:
            requests[adapter.label] = None
        else:
            requests[adapter.label] = (adapter.label, next_id, str(adapter.path))
            next_id += 1
    return requests


def sampling_args(
    budget: int,
    eos_ids: Sequence[int],
    seed: int,
    decoding: Decoding = GREEDY,
    stop: Sequence[str] = STOP_STRINGS,
) -> dict[str, Any]:
    """Stopped at the task's stop strings (GSM8K's by default) and the end tokens (lm-eval's
    `until`); greedy, or `n` samples at the decoding's temperature and top-p. With a request
    seed vLLM draws the n samples from one seeded generator per request (per sample in v1)."""
    args: dict[str, Any] = {
        "temperature": 0.0,
        "max_tokens": budget,
        "stop": list(stop),
        "stop_token_ids": sorted(eos_ids),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "seed": seed,
    }
    if not decoding.greedy:
        args |= {"n": decoding.n, "temperature": decoding.temperature, "top_p": decoding.top_p}
    return args


def requests_for(adapters: Sequence[Adapter], n_prompts: int) -> list[tuple[str, int]]:
    """(adapter label, prompt index) for every request, adapter by adapter."""
    return [(a.label, i) for a in adapters for i in range(n_prompts)]


def finish_reason(reason: str | None, stop_reason: object) -> Finish:
    if reason == "length":
        return "length"
    return "stop" if isinstance(stop_reason, str) else "eos"


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        args: dict[str, Any],
        eos_ids: Sequence[int],
        seed: int,
        decoding: Decoding = GREEDY,
        stop: Sequence[str] = STOP_STRINGS,
    ) -> None:
        # the `vllm` extra, imported by name: `engines.choose` checked it is installed
        vllm = importlib.import_module("vllm")

        self._vllm = vllm
        self.eos_ids, self.seed = list(eos_ids), seed
        self.decoding, self.stop = decoding, tuple(stop)
        log.info(f"starting vLLM: {args}")
        self.llm = vllm.LLM(**args)

    def generate(
        self,
        adapters: Sequence[Adapter],
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        on_batch: OnBatch,
    ) -> dict[str, list[Generation]]:
        LoRARequest = importlib.import_module("vllm.lora.request").LoRARequest
        loras = {
            label: None if spec is None else LoRARequest(*spec)
            for label, spec in lora_requests(adapters).items()
        }
        requests = requests_for(adapters, len(prompts))
        results: dict[str, list[Generation]] = {a.label: [] for a in adapters}
        for start in range(0, len(requests), REQUESTS_PER_CALL):
            chunk = requests[start : start + REQUESTS_PER_CALL]
            outputs = self.llm.generate(
                [{"prompt_token_ids": prompts[i]} for _, i in chunk],
                [self._params(budgets[i]) for _, i in chunk],
                lora_request=[loras[label] for label, _ in chunk],
                use_tqdm=False,
            )
            tokens = 0
            for (label, _), output in zip(chunk, outputs, strict=True):
                for sample in output.outputs[: self.decoding.n]:  # n per prompt, in order
                    reason = finish_reason(sample.finish_reason, sample.stop_reason)
                    text = cut_at_stop(sample.text, self.stop)  # vLLM stops there already
                    results[label].append(Generation(text, len(sample.token_ids), reason))
                    tokens += len(sample.token_ids)
            on_batch(len(chunk) * self.decoding.n, tokens)
        return results

    def _params(self, budget: int) -> Any:
        args = sampling_args(budget, self.eos_ids, self.seed, self.decoding, self.stop)
        return self._vllm.SamplingParams(**args)
