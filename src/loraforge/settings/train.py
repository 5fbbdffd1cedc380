"""Settings of the train job (`loraforge-train`). Issue #4 grows this class; names are pinned
by the design (LORAFORGE_DATA, _VAL_DATA, _METHOD, _RANK, _QUANTIZATION, _PACKING, _MAX_STEPS)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from loraforge.settings.base import JobSettings


class TrainSettings(JobSettings):
    job: ClassVar[str] = "train"

    data: str = Field(min_length=1)
    """Training data: a JSONL path, `s3://` URI or `hf://dataset[:config]/split`."""

    val_data: str | None = None
    """Validation data (same forms as LORAFORGE_DATA); default: a fraction held out of the data."""

    method: Literal["lora", "dora", "bidora"] = "lora"
    """Adapter method: `lora` (rsLoRA scaling by default), `dora`, or bi-level `bidora`."""

    rank: int = Field(default=16, ge=1, le=1024)
    """LoRA rank r of every adapted module."""

    quantization: Literal["auto", "none", "nf4", "int8"] = "auto"
    """Base weights: `none` (bf16/fp32), bitsandbytes `nf4` or `int8`; `auto` sizes for the GPU."""

    packing: bool = True
    """Pack sequences padding-free, attention isolated per sequence."""

    max_steps: int = Field(default=1000, ge=1)
    """Optimizer steps to train for."""
