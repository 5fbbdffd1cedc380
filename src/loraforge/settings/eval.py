"""Settings of the eval job (`loraforge-eval`). Names pinned by the design: LORAFORGE_ADAPTERS,
_EVAL_DATA, _ENGINE, _EVAL_LIMIT; the rest follow lm-eval-harness (`num_fewshot`, `seed`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from loraforge.settings.base import JobSettings

# What each profile sets unless LORAFORGE_NUM_FEWSHOT / LORAFORGE_MAX_NEW_TOKENS say otherwise.
# Both are greedy; `paper_math` is lm-eval's `gsm8k` task, `greedy_math` the train job's prompt.
PROFILES: dict[str, dict[str, int]] = {
    "paper_math": {"num_fewshot": 5, "max_new_tokens": 512},
    "greedy_math": {"num_fewshot": 0, "max_new_tokens": 512},
}
Profile = Literal["paper_math", "greedy_math"]


class EvalSettings(JobSettings):
    job: ClassVar[str] = "eval"

    adapters: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["base"])
    """Comma-separated adapter URIs to score; `base` scores the base model without an adapter.
    Every adapter is compared with the first one listed."""

    eval_data: str = "hf://openai/gsm8k:main/test"
    """GSM8K-style data (question/answer with `#### N`): JSONL path, `s3://` or `hf://`."""

    fewshot_data: str | None = None
    """Where few-shot examples are drawn from (same forms as LORAFORGE_EVAL_DATA); default: the
    `train` split of an `hf://` LORAFORGE_EVAL_DATA, else LORAFORGE_EVAL_DATA itself. A problem is
    never its own example."""

    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation engine: `vllm` (GPU, plain LoRA adapters), `transformers` (anywhere, any PEFT
    adapter); `auto` takes vLLM when it is installed, a GPU is visible and it can serve every
    adapter."""

    profile: Profile = "paper_math"
    """Evaluation profile: `paper_math` (lm-eval gsm8k: 5-shot, greedy, 512 new tokens) or
    `greedy_math` (0-shot `Question: ...\\nAnswer:` as the train job prompts, greedy, 512)."""

    num_fewshot: int | None = Field(default=None, ge=0, le=64)
    """Worked examples before each question; default: the profile's."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    """Most tokens generated per answer (fewer when the prompt nearly fills the model's
    context); default: the profile's."""

    eval_limit: int | None = Field(default=None, ge=1)
    """Score only this many problems, drawn with LORAFORGE_SEED (kept in file order); default:
    all of them."""

    seed: int = 1234
    """Seed of the LORAFORGE_EVAL_LIMIT subset, the few-shot draws and the bootstrap (1234 is
    lm-eval's few-shot seed)."""

    chat_template: bool = False
    """Prompt through the tokenizer's chat template, each example a user/assistant turn (for
    instruct models); `false` gives lm-eval's plain-text prompt."""

    batch_size: int = Field(default=32, ge=1)
    """Prompts generated together by the transformers engine (sorted by length)."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the base: `auto` is bf16 on GPUs that support it, fp16 on older GPUs,
    fp32 on the CPU."""

    metric: Literal["strict", "flexible"] = "strict"
    """Which match the verdict is about: `strict` (the `#### N` answer) or `flexible` (the last
    number in the output). Both are always reported."""

    bootstrap_samples: int = Field(default=10_000, ge=100)
    """Resamples of the paired bootstrap behind each difference's 95% interval."""

    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of GPU memory vLLM may take (weights, KV cache, LoRA slots)."""

    @field_validator("adapters", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list) and (not value or any(not v for v in value)):
            raise ValueError("give one or more comma-separated URIs (or `base`), none empty")
        if isinstance(value, list) and len(set(value)) < len(value):
            twice = sorted({v for v in value if value.count(v) > 1})
            raise ValueError(f"{', '.join(twice)} listed more than once: list each adapter once")
        return value

    @property
    def shots(self) -> int:
        """Few-shot examples per prompt: LORAFORGE_NUM_FEWSHOT, else the profile's."""
        if self.num_fewshot is not None:
            return self.num_fewshot
        return PROFILES[self.profile]["num_fewshot"]

    @property
    def new_tokens(self) -> int:
        """LORAFORGE_MAX_NEW_TOKENS, else the profile's."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return PROFILES[self.profile]["max_new_tokens"]
