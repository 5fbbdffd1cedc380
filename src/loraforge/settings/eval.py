"""Settings of the eval job (`loraforge-eval`). Issue #6 grows this class."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from loraforge.settings.base import JobSettings


class EvalSettings(JobSettings):
    job: ClassVar[str] = "eval"

    adapters: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["base"])
    """Comma-separated adapter URIs to score; `base` scores the base model without an adapter."""

    eval_data: str = "hf://openai/gsm8k:main/test"
    """GSM8K-style data (question/answer with `#### N`): JSONL path, `s3://` or `hf://`."""

    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation engine: `vllm` on GPU, `transformers` anywhere; `auto` picks."""

    @field_validator("adapters", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list) and (not value or any(not v for v in value)):
            raise ValueError("give one or more comma-separated URIs (or `base`), none empty")
        return value
