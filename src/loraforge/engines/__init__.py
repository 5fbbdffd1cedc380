"""Generation engines for the eval job, and which one runs.

Both engines take the same token ids and per-prompt token budgets, generate greedily or sample
(`Decoding`: n completions per prompt, temperature, top-p), stop at the task's stop strings or
an end token, and return each output cut at the first stop string.
`transformers` loads the base once and switches PEFT adapters in place; `vllm` serves every
adapter from one engine through LoRA requests. vLLM is an optional extra (`loraforge[vllm]`):
nothing here imports it unless it is chosen.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from loraforge.adapters import Adapter, vllm_obstacles
from loraforge.errors import PermanentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger("loraforge.engines")

Finish = Literal["stop", "eos", "length"]
# Called after each finished batch with (completions done in it, tokens generated in it).
OnBatch = Callable[[int, int], None]


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen: greedy (temperature 0) or sampled from the temperature-
    scaled distribution cut to its top-p nucleus; `n` completions per prompt, seeded by `seed`
    and the prompt's position, the same random draws for every adapter (common random numbers:
    differences between adapters come from the models, not the dice)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid decoding {self}")
        if self.greedy and self.n > 1:
            raise ValueError(f"{self.n} greedy completions per prompt would be identical")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Decoding()


@dataclass(frozen=True)
class Generation:
    text: str  # the output cut before the first stop string
    tokens: int  # tokens generated, up to and including the one that stopped it
    finish: Finish


class Engine(Protocol):
    name: str

    def generate(
        self,
        adapters: Sequence[Adapter],
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        on_batch: OnBatch,
    ) -> dict[str, list[Generation]]:
        """Every prompt under every adapter: {adapter label: generations in prompt order}, each
        prompt's `n` completions next to each other (prompt i, sample j at i * n + j)."""
        ...


def end_token_ids(tokenizer: Tokenizer, generation_eos: int | list[int] | None) -> frozenset[int]:
    """The tokenizer's EOS and every end token the model's generation config names."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose(
    requested: str, adapters: Sequence[Adapter], *, has_vllm: bool, has_cuda: bool
) -> tuple[str, str]:
    """(engine, why). `vllm` when asked for and possible, else a one-line error; `auto` takes
    vLLM only when it is installed, a GPU is visible and it can serve every adapter."""
    obstacles = [o for a in adapters for o in vllm_obstacles(a)]
    if requested == "vllm":
        if not has_vllm:
            raise PermanentError(
                "LORAFORGE_ENGINE=vllm but vLLM is not installed: use the CUDA image (it has "
                "the loraforge[vllm] extra) or set LORAFORGE_ENGINE=transformers"
            )
        if not has_cuda:
            raise PermanentError(
                "LORAFORGE_ENGINE=vllm needs a CUDA GPU and none is visible: run on a GPU node "
                "or set LORAFORGE_ENGINE=transformers"
            )
        if obstacles:
            raise PermanentError(
                f"LORAFORGE_ENGINE=vllm cannot serve {'; '.join(obstacles)}: vLLM serves plain "
                "LoRA only; set LORAFORGE_ENGINE=transformers (or auto, which routes there)"
            )
        return "vllm", "requested"
    if requested == "transformers":
        return "transformers", "requested"
    if not has_vllm:
        return "transformers", "vLLM is not installed"
    if not has_cuda:
        return "transformers", "no CUDA GPU is visible"
    if obstacles:
        return "transformers", f"vLLM cannot serve {'; '.join(obstacles)}"
    return "vllm", "vLLM is installed, a GPU is visible and every adapter is plain LoRA"
