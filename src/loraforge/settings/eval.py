"""Settings of the eval job (`loraforge-eval`). Names pinned by the design: LORAFORGE_ADAPTERS,
_EVAL_DATA, _ENGINE, _EVAL_LIMIT; the rest follow lm-eval-harness (`num_fewshot`, `seed`) and
the HumanEval paper (`n_samples`, `temperature`, `top_p`, `pass_k`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from loraforge.settings.base import JobSettings

Task = Literal["gsm8k", "humaneval"]
ProfileName = Literal["paper_math", "greedy_math", "paper_code_main", "greedy_code"]


@dataclass(frozen=True)
class Profile:
    """What a profile sets unless the matching LORAFORGE_* variable says otherwise."""

    task: Task
    num_fewshot: int
    max_new_tokens: int
    n_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


# `paper_math` is lm-eval's `gsm8k` task, `greedy_math` the train job's prompt (both greedy);
# `paper_code_main` the HumanEval paper's pass@1/pass@10 setting (Chen et al. 2021: 200 samples
# at T=0.2 for pass@1; the seed's profile draws 50), `greedy_code` one greedy completion.
PROFILES: dict[str, Profile] = {
    "paper_math": Profile("gsm8k", num_fewshot=5, max_new_tokens=512),
    "greedy_math": Profile("gsm8k", num_fewshot=0, max_new_tokens=512),
    "paper_code_main": Profile(
        "humaneval", num_fewshot=0, max_new_tokens=512, n_samples=50, temperature=0.2, top_p=0.95
    ),
    "greedy_code": Profile("humaneval", num_fewshot=0, max_new_tokens=512),
}
DEFAULT_PROFILE: dict[str, str] = {"gsm8k": "paper_math", "humaneval": "paper_code_main"}
DEFAULT_DATA: dict[str, str] = {
    "gsm8k": "hf://openai/gsm8k:main/test",
    "humaneval": "hf://openai/openai_humaneval/test",
}
DEFAULT_PASS_K = (1, 10)


class EvalSettings(JobSettings):
    job: ClassVar[str] = "eval"

    adapters: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["base"])
    """Comma-separated adapter URIs to score; `base` scores the base model without an adapter.
    Every adapter is compared with the first one listed."""

    task: Task = "gsm8k"
    """What is scored: `gsm8k` (maths word problems, exact match of the final number) or
    `humaneval` (Python functions completed from their signature and docstring, run against
    their unit tests in a sandbox, scored by pass@k)."""

    eval_data: str | None = None
    """Problems: JSONL path, `s3://` or `hf://`. gsm8k: question/answer with `#### N` (default
    `hf://openai/gsm8k:main/test`); humaneval: task_id, prompt, test and entry_point (default
    `hf://openai/openai_humaneval/test`)."""

    fewshot_data: str | None = None
    """Where few-shot examples are drawn from (same forms as LORAFORGE_EVAL_DATA); default: the
    `train` split of an `hf://` LORAFORGE_EVAL_DATA, else LORAFORGE_EVAL_DATA itself. A problem is
    never its own example."""

    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation engine: `vllm` (GPU, plain LoRA adapters), `transformers` (anywhere, any PEFT
    adapter); `auto` takes vLLM when it is installed, a GPU is visible and it can serve every
    adapter."""

    profile: ProfileName | None = None
    """Evaluation profile. gsm8k: `paper_math` (lm-eval gsm8k: 5-shot, greedy, 512 new tokens;
    the default) or `greedy_math` (0-shot `Question: ...\\nAnswer:` as the train job prompts,
    greedy, 512). humaneval: `paper_code_main` (50 samples per problem at temperature 0.2, top-p
    0.95, 512 new tokens; the default) or `greedy_code` (one greedy completion, 512)."""

    num_fewshot: int | None = Field(default=None, ge=0, le=64)
    """Worked examples before each question; default: the profile's."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    """Most tokens generated per answer (fewer when the prompt nearly fills the model's
    context); default: the profile's."""

    n_samples: int | None = Field(default=None, ge=1, le=1000)
    """humaneval: completions sampled per problem (the n of pass@k); default: the profile's."""

    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    """humaneval: sampling temperature, 0 for greedy decoding; default: the profile's."""

    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """humaneval: nucleus sampling keeps the most likely tokens whose probabilities add up to
    this; default: the profile's."""

    pass_k: Annotated[list[int], NoDecode] | None = None
    """humaneval: comma-separated k of the pass@k reported (each at most LORAFORGE_N_SAMPLES);
    default: 1 and 10, those the samples allow. The verdict is about the smallest."""

    sandbox_timeout: float = Field(default=10.0, gt=0.0, le=600.0)
    """humaneval: wall-clock seconds one completion may run with its tests (its CPU-time limit
    is the same, rounded up); it is killed with every process it started when time is up."""

    sandbox_memory_mb: int = Field(default=2048, ge=64)
    """humaneval: address-space limit of one running completion, in MiB (RLIMIT_AS)."""

    sandbox_workers: int | None = Field(default=None, ge=1)
    """humaneval: completions run at once, each in its own process; default: the CPUs the pod
    may use."""

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
    """gsm8k: which match the verdict is about: `strict` (the `#### N` answer) or `flexible` (the
    last number in the output). Both are always reported."""

    bootstrap_samples: int = Field(default=10_000, ge=100)
    """Resamples of the paired bootstrap behind each difference's 95% interval."""

    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of GPU memory vLLM may take (weights, KV cache, LoRA slots)."""

    tensor_parallel: int = Field(default=1, ge=1, le=64)
    """vLLM: GPUs one model is split across (vLLM's tensor_parallel_size), for a base that does
    not fit one GPU; the pod needs that many GPUs. The transformers engine runs on one device and
    refuses more than 1."""

    shards: int = Field(default=1, ge=1, le=10_000)
    """Split the problems into this many shards, each scored by its own job (a Kubernetes
    Indexed Job with this many completions). Shard i publishes a partial artifact at
    `<LORAFORGE_OUTPUT>-shards/<i>-of-<n>`; the last one to finish merges them into
    LORAFORGE_OUTPUT, with the metrics an unsharded run gives."""

    shard: str | None = None
    """Which shard this job scores, 0 .. LORAFORGE_SHARDS-1 (default: the Indexed Job's
    JOB_COMPLETION_INDEX), or `merge`: check every shard's partial artifact and publish the
    merged result (exit 75 while a shard is missing)."""

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

    @field_validator("shard", mode="before")
    @classmethod
    def _shard_index(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if not (value.isdigit() or value == "merge"):
                raise ValueError("give a shard index (0, 1, ...) or `merge`")
            value = value if value == "merge" else str(int(value))
        return value

    @field_validator("profile", mode="before")
    @classmethod
    def _known_profile(cls, value: object) -> object:
        if isinstance(value, str) and value not in PROFILES:
            raise ValueError(
                "input should be 'paper_math' or 'greedy_math' (LORAFORGE_TASK=gsm8k), or "
                "'paper_code_main' or 'greedy_code' (LORAFORGE_TASK=humaneval)"
            )
        return value

    @field_validator("pass_k", mode="before")
    @classmethod
    def _split_k(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
                raise ValueError("give comma-separated whole numbers >= 1, e.g. 1,10")
            value = sorted({int(p) for p in parts})
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EvalSettings:
        problems = []
        profile = PROFILES[self.profile_name]
        if profile.task != self.task:
            problems.append(
                f"LORAFORGE_PROFILE={self.profile_name} is a {profile.task} profile: set "
                f"LORAFORGE_TASK={profile.task} or a {self.task} profile"
            )
        problems += self._shard_problems()
        if self.task == "humaneval":
            problems += self._code_problems()
        else:
            code_only = ("n_samples", "temperature", "top_p", "pass_k")
            problems += [
                f"LORAFORGE_{name.upper()} applies to LORAFORGE_TASK=humaneval only (gsm8k is "
                "scored greedily): remove it"
                for name in code_only
                if getattr(self, name) is not None
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _shard_problems(self) -> list[str]:
        if self.shard is None:
            return []
        if self.shards == 1:
            return [
                f"LORAFORGE_SHARD={self.shard} but LORAFORGE_SHARDS=1: set LORAFORGE_SHARDS to "
                "the number of shards, or remove LORAFORGE_SHARD"
            ]
        if self.shard != "merge" and int(self.shard) >= self.shards:
            return [
                f"LORAFORGE_SHARD={self.shard} is not a shard of LORAFORGE_SHARDS={self.shards}: "
                f"use 0 to {self.shards - 1}, or `merge`"
            ]
        return []

    def _code_problems(self) -> list[str]:
        problems = []
        n = self.samples
        if n > 1 and self.sampling_temperature == 0:
            problems.append(
                f"{n} samples per problem with greedy decoding (temperature 0) are {n} copies: "
                "set LORAFORGE_TEMPERATURE above 0 or LORAFORGE_N_SAMPLES=1"
            )
        too_large = [k for k in self.pass_k or () if k > n]
        if too_large:
            problems.append(
                f"LORAFORGE_PASS_K={','.join(map(str, self.pass_k or ()))}: pass@{too_large[0]} "
                f"needs at least {too_large[0]} samples per problem and there are {n} "
                f"(profile {self.profile_name}): lower k or raise LORAFORGE_N_SAMPLES"
            )
        if self.chat_template:
            problems.append(
                "LORAFORGE_CHAT_TEMPLATE=true: humaneval completions continue the prompt's code "
                "as plain text; set it to false"
            )
        if self.num_fewshot:
            problems.append("LORAFORGE_NUM_FEWSHOT: humaneval prompts are 0-shot; remove it")
        return problems

    @property
    def profile_name(self) -> str:
        """LORAFORGE_PROFILE, else the task's default profile."""
        return self.profile or DEFAULT_PROFILE[self.task]

    @property
    def data(self) -> str:
        """LORAFORGE_EVAL_DATA, else the task's standard test split."""
        return self.eval_data or DEFAULT_DATA[self.task]

    @property
    def shots(self) -> int:
        """Few-shot examples per prompt: LORAFORGE_NUM_FEWSHOT, else the profile's."""
        if self.num_fewshot is not None:
            return self.num_fewshot
        return PROFILES[self.profile_name].num_fewshot

    @property
    def new_tokens(self) -> int:
        """LORAFORGE_MAX_NEW_TOKENS, else the profile's."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return PROFILES[self.profile_name].max_new_tokens

    @property
    def samples(self) -> int:
        """Completions per problem: LORAFORGE_N_SAMPLES, else the profile's."""
        return self.n_samples or PROFILES[self.profile_name].n_samples

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return PROFILES[self.profile_name].temperature

    @property
    def sampling_top_p(self) -> float:
        return self.top_p if self.top_p is not None else PROFILES[self.profile_name].top_p

    @property
    def ks(self) -> list[int]:
        """The k of pass@k: LORAFORGE_PASS_K, else 1 and 10 where the samples allow."""
        return self.pass_k or [k for k in DEFAULT_PASS_K if k <= self.samples]
