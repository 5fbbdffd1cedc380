"""Edit-mode parameters (torch-free: the settings and the launcher import them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Mode = Literal[
    "abs_select", "smooth_abs", "double_smooth", "z_score", "robust_z", "random_index", "gd"
]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EditParams:
    mode: Mode = "abs_select"
    core_frac: float = 0.2
    noise_frac: float = 0.2
    amp: float = 1.25
    sup: float = 0.8
    mid: float = 1.0
    min_core_k: int = 1
    smooth_temperature: float = 0.35
    smooth_center_q: float = 0.5
    smooth_align_mid: bool = True
    z_high: float = 1.0
    z_low: float = -0.5
    z_tau: float = 0.2
    z_fallback_std: float = 1e-6
    robust_z_high: float = 1.0
    robust_z_low: float = -0.5
    robust_z_tau: float = 0.2
    robust_fallback_sigma: float = 1e-6
    eta: float = 0.2
    update_mode: Literal["additive", "multiplicative"] = "multiplicative"
    asymmetric: bool = True
    eta_suppress: float = 2.0
    eta_enhance: float = 0.2
    pos_power: float = 1.0
    grad_norm: Literal["none", "mean_abs", "l2"] = "mean_abs"
    preserve_energy: Literal["none", "l1", "l2"] = "l1"
    sigma_clip_min: float = 0.0
    seed: int = 0  # random_index only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
