"""Settings of the calibrate-and-edit job (`loraforge-edit`). Mode parameters and defaults are
the seed's (lora-spectral-edit); LORAFORGE_ADAPTER, _CALIB_DATA and _EDIT_MODE are pinned."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from loraforge.settings.base import JobSettings
from loraforge.spectral.params import Mode


class EditSettings(JobSettings):
    job: ClassVar[str] = "edit"

    adapter: str = Field(min_length=1)
    """The adapter artifact to edit (`s3://` URI or local path); it is never modified."""

    calib_data: str = "hf://openai/gsm8k:main/train"
    """Calibration data (question/answer records): JSONL path, `s3://` URI or `hf://dataset[:config]/split`."""

    calib_samples: int = Field(default=32, ge=1)
    """Calibration examples drawn (with LORAFORGE_SEED) from the calibration data."""

    calib_batch_size: int = Field(default=2, ge=1)
    """Calibration examples per forward/backward pass."""

    max_seq_len: int = Field(default=2048, ge=8)
    """Longest calibration example in tokens; longer ones are an error."""

    target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["down_proj", "o_proj"]
    )
    """Comma-separated adapted modules to edit (short names, e.g. down_proj,o_proj)."""

    layers: str = "all"
    """Decoder layers to edit: `all`, or an inclusive range `first-last` (e.g. 8-15)."""

    edit_mode: Mode = "abs_select"
    """How σ is edited from g = ∂L/∂σ: abs_select, smooth_abs, double_smooth, z_score, robust_z,
    random_index (control: same counts, random positions) or gd."""

    core_frac: float = Field(default=0.2, ge=0, le=1)
    """Share of singular values with the largest |g| that are amplified."""

    noise_frac: float = Field(default=0.2, ge=0, le=1)
    """Share of singular values with the smallest |g| that are suppressed."""

    amp: float = Field(default=1.25, gt=0)
    """Factor for the core (most sensitive) singular values."""

    sup: float = Field(default=0.8, ge=0)
    """Factor for the noise (least sensitive) singular values."""

    mid: float = Field(default=1.0, ge=0)
    """Factor for the others."""

    min_core_k: int = Field(default=1, ge=0)
    """At least this many core singular values per module."""

    smooth_temperature: float = Field(default=0.35, gt=0)
    """Sigmoid temperature of smooth_abs/double_smooth, relative to the spread of |g|."""

    smooth_center_q: float = Field(default=0.5, ge=0, le=1)
    """Quantile of |g| at the centre of the smooth_abs gate."""

    smooth_align_mid: bool = True
    """smooth_abs: shift the gate so that the centre quantile gets exactly LORAFORGE_MID."""

    z_high: float = 1.0
    """z_score: z above which singular values are amplified."""

    z_low: float = -0.5
    """z_score: z below which singular values are suppressed."""

    z_tau: float = Field(default=0.2, gt=0)
    """z_score: sigmoid temperature in z units."""

    robust_z_high: float = 1.0
    """robust_z: robust z (median/MAD) above which singular values are amplified."""

    robust_z_low: float = -0.5
    """robust_z: robust z below which singular values are suppressed."""

    robust_z_tau: float = Field(default=0.2, gt=0)
    """robust_z: sigmoid temperature."""

    eta: float = Field(default=0.2, gt=0)
    """gd: step size of the symmetric update."""

    update_mode: Literal["additive", "multiplicative"] = "multiplicative"
    """gd: σ - step (additive) or σ·exp(-step) (multiplicative)."""

    asymmetric: bool = True
    """gd: suppress (g > 0) with LORAFORGE_ETA_SUPPRESS and enhance (g < 0) with _ETA_ENHANCE."""

    eta_suppress: float = Field(default=2.0, ge=0)
    """gd: step size where the loss grows with σ."""

    eta_enhance: float = Field(default=0.2, ge=0)
    """gd: step size where the loss falls with σ."""

    pos_power: float = Field(default=1.0, gt=0)
    """gd: power applied to positive gradients."""

    grad_norm: Literal["none", "mean_abs", "l2"] = "mean_abs"
    """Normalisation of g per module before the mode sees it."""

    preserve_energy: Literal["none", "l1", "l2"] = "l1"
    """Rescale σ' to σ's l1 or l2 norm per module."""

    sigma_clip_min: float = Field(default=0.0, ge=0)
    """Lower bound on σ' before the energy rescale."""

    seed: int = 0
    """Seed of the calibration sample and of random_index."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the base: bf16 or fp16 on GPUs, fp32 on the CPU."""

    quantization: Literal["none", "nf4", "int8"] = "none"
    """Base weights for calibration: `none`, or bitsandbytes `nf4`/`int8` to save memory."""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("name at least one adapted module (e.g. down_proj,o_proj)")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str) -> str:
        if value != "all" and not re.fullmatch(r"\d+-\d+", value):
            raise ValueError("use `all` or an inclusive range like 8-15")
        if value != "all" and int(value.split("-")[0]) > int(value.split("-")[1]):
            raise ValueError("the range's first layer is after its last")
        return value

    @model_validator(mode="after")
    def _fractions(self) -> EditSettings:
        if self.core_frac + self.noise_frac > 1:
            raise ValueError(
                f"LORAFORGE_CORE_FRAC + LORAFORGE_NOISE_FRAC = {self.core_frac + self.noise_frac:g}"
                " > 1: the core and noise sets would overlap; lower one of them"
            )
        return self

    def layer_range(self) -> tuple[int, int] | None:
        if self.layers == "all":
            return None
        first, last = self.layers.split("-")
        return int(first), int(last)
