"""Settings of the calibrate-and-edit job (`loraforge-edit`). Issue #5 grows this class."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from loraforge.settings.base import JobSettings

EditMode = Literal[
    "abs_select", "smooth_abs", "double_smooth", "z_score", "robust_z", "random_index", "gd"
]


class EditSettings(JobSettings):
    job: ClassVar[str] = "edit"

    adapter: str = Field(min_length=1)
    """The adapter artifact to edit (`s3://` URI or local path); it is never modified."""

    calib_data: str = "hf://openai/gsm8k:main/train"
    """Calibration data: JSONL path, `s3://` URI or `hf://dataset[:config]/split`."""

    edit_mode: EditMode = "abs_select"
    """How singular values are edited from their sensitivities; `random_index` is the control."""
