"""Edit modes: each a small pure function of (σ, g, params) -> (σ', statistics).

The seed's seven modes with its defaults (lora-spectral-edit): `abs_select` amplifies the
singular values with the largest |g| and suppresses those with the smallest; `smooth_abs`,
`double_smooth`, `z_score` and `robust_z` do the same with continuous gates; `random_index` is
the control (same counts, random positions, seeded so an edit replays); `gd` takes a signed
gradient step on σ. Then σ' is clipped at `sigma_clip_min` and rescaled to keep σ's l1/l2 energy.
"""

from __future__ import annotations

from typing import Any

import torch

from loraforge.spectral.params import EditParams

Stats = dict[str, Any]
_EPS = 1e-8


def normalise(g: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mean_abs":
        return g / g.abs().mean().clamp_min(_EPS)
    if method == "l2":
        return g / torch.linalg.norm(g).clamp_min(_EPS)  # type: ignore[no-any-return]
    return g


def counts(r: int, p: EditParams) -> tuple[int, int]:
    """(k_core, k_noise): rounded fractions of r, at least `min_core_k` core, never overlapping."""
    k_core = min(max(round(r * p.core_frac), p.min_core_k), r)
    k_noise = max(0, min(round(r * p.noise_frac), r - k_core))
    return k_core, k_noise


def _gate_from_indices(
    S: torch.Tensor, core: torch.Tensor, noise: torch.Tensor, p: EditParams
) -> torch.Tensor:
    gate = torch.full_like(S, p.mid)
    gate[core] = p.amp
    gate[noise] = p.sup
    return gate


def abs_select(S: torch.Tensor, g_abs: torch.Tensor, p: EditParams) -> tuple[torch.Tensor, Stats]:
    k_core, k_noise = counts(S.numel(), p)
    order = torch.argsort(g_abs, descending=True, stable=True)
    core, noise = order[:k_core], order[order.numel() - k_noise :]
    gate = _gate_from_indices(S, core, noise, p)
    return S * gate, {"core": core.tolist(), "noise": noise.tolist()}


def random_index(S: torch.Tensor, p: EditParams, key: str) -> tuple[torch.Tensor, Stats]:
    """The control: abs_select's counts at random positions, seeded by (seed, module)."""
    k_core, k_noise = counts(S.numel(), p)
    generator = torch.Generator().manual_seed(p.seed ^ (hash_key(key) & 0x7FFFFFFF))
    order = torch.randperm(S.numel(), generator=generator)
    core, noise = order[:k_core], order[k_core : k_core + k_noise]
    gate = _gate_from_indices(S, core, noise, p)
    return S * gate, {"core": core.tolist(), "noise": noise.tolist()}


def hash_key(key: str) -> int:
    """A stable hash of a module name (Python's hash() is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _sigmoid_gate(
    x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor, p: EditParams
) -> torch.Tensor:
    return p.sup + (p.amp - p.sup) * torch.sigmoid((x - mu) / tau)


def smooth_abs(S: torch.Tensor, g_abs: torch.Tensor, p: EditParams) -> tuple[torch.Tensor, Stats]:
    """One sigmoid from sup to amp over |g|; with align-mid, gate(center quantile) = mid."""
    x = g_abs.float()
    if float(x.max() - x.min()) < 1e-12:
        return S * p.mid, {"degenerate": True}
    q_lo, q_hi = min(max(p.noise_frac, 0.0), 1.0), min(max(1.0 - p.core_frac, 0.0), 1.0)
    if q_hi <= q_lo:
        q_lo, q_hi = 0.25, 0.75
    spread = (torch.quantile(x, q_hi) - torch.quantile(x, q_lo)).clamp_min(_EPS)
    center = torch.quantile(x, min(max(p.smooth_center_q, 0.0), 1.0))
    tau = (p.smooth_temperature * spread).clamp_min(_EPS)
    mu = center
    if p.smooth_align_mid and p.sup < p.mid < p.amp:
        share = min(max((p.mid - p.sup) / (p.amp - p.sup), 1e-4), 1 - 1e-4)
        mu = center - tau * torch.logit(torch.tensor(share))
    gate = _sigmoid_gate(x, mu, tau, p)
    return S * gate.to(S.dtype), {"mu": float(mu), "tau": float(tau), "degenerate": False}


def double_smooth(
    S: torch.Tensor, g_abs: torch.Tensor, p: EditParams
) -> tuple[torch.Tensor, Stats]:
    """Two sigmoids: towards sup below the noise quantile, towards amp above the core one."""
    x = g_abs.float()
    q_noise, q_core = min(max(p.noise_frac, 0.0), 1.0), min(max(1.0 - p.core_frac, 0.0), 1.0)
    if q_noise >= q_core:
        q_noise, q_core = 0.45, 0.55
    t_noise, t_core = torch.quantile(x, q_noise), torch.quantile(x, q_core)
    tau = (p.smooth_temperature * (x.max() - x.min())).clamp_min(_EPS)
    gate = (
        p.mid
        - (p.mid - p.sup) * torch.sigmoid((t_noise - x) / tau)
        + (p.amp - p.mid) * torch.sigmoid((x - t_core) / tau)
    )
    return S * gate.to(S.dtype), {
        "threshold_noise": float(t_noise),
        "threshold_core": float(t_core),
        "tau": float(tau),
    }


def _z_gate(z: torch.Tensor, high: float, low: float, tau: float, p: EditParams) -> torch.Tensor:
    tau = max(tau, _EPS)
    return (
        p.mid
        + (p.amp - p.mid) * torch.sigmoid((z - high) / tau)
        - (p.mid - p.sup) * torch.sigmoid((low - z) / tau)
    )


def z_score(S: torch.Tensor, g_abs: torch.Tensor, p: EditParams) -> tuple[torch.Tensor, Stats]:
    """Double sigmoid in z = (|g| - mean)/std; falls back to identity when |g| is flat."""
    x = g_abs.float()
    std = x.std(unbiased=False)
    z = (x - x.mean()) / std.clamp_min(_EPS)
    if float(std) < p.z_fallback_std or float(z.abs().max()) < 1e-3:
        return S.clone(), {"fallback": True}
    gate = _z_gate(z, p.z_high, p.z_low, p.z_tau, p)
    return S * gate.to(S.dtype), {
        "fallback": False,
        "k_core_eff": int((z > p.z_high).sum()),
        "k_noise_eff": int((z < p.z_low).sum()),
    }


def robust_z(S: torch.Tensor, g_abs: torch.Tensor, p: EditParams) -> tuple[torch.Tensor, Stats]:
    """As z_score with median and MAD·1.4826 (outlier-proof); identity when MAD vanishes."""
    x = g_abs.float()
    median = x.median()
    spread = ((x - median).abs().median() * 1.4826).clamp_min(_EPS)
    if float(spread) < p.robust_fallback_sigma:
        return S.clone(), {"fallback": True}
    z = (x - median) / spread
    gate = _z_gate(z, p.robust_z_high, p.robust_z_low, p.robust_z_tau, p)
    return S * gate.to(S.dtype), {
        "fallback": False,
        "k_core_eff": int((z > p.robust_z_high).sum()),
        "k_noise_eff": int((z < p.robust_z_low).sum()),
    }


def gd(S: torch.Tensor, g: torch.Tensor, p: EditParams) -> tuple[torch.Tensor, Stats]:
    """A step against the signed gradient; asymmetric: suppress (g > 0) harder than enhance."""
    if p.asymmetric:
        step = p.eta_suppress * torch.relu(g).pow(p.pos_power) - p.eta_enhance * torch.relu(-g)
    else:
        step = p.eta * g
    S_new = S - step if p.update_mode == "additive" else S * torch.exp(-step)
    return S_new, {}


def preserve_energy(S: torch.Tensor, S_new: torch.Tensor, method: str) -> torch.Tensor:
    if method == "l1":
        return S_new * (S.sum().clamp_min(_EPS) / S_new.sum().clamp_min(_EPS))
    if method == "l2":
        return S_new * (  # type: ignore[no-any-return]
            torch.linalg.norm(S).clamp_min(_EPS) / torch.linalg.norm(S_new).clamp_min(_EPS)
        )
    return S_new


def edit_sigma(
    S: torch.Tensor, g: torch.Tensor, p: EditParams, key: str = ""
) -> tuple[torch.Tensor, Stats]:
    """σ' for one module from its σ and g = ∂L/∂σ; `key` (module name) seeds random_index."""
    g_abs = normalise(g.abs(), p.grad_norm)
    if p.mode == "abs_select":
        S_new, stats = abs_select(S, g_abs, p)
    elif p.mode == "random_index":
        S_new, stats = random_index(S, p, key)
    elif p.mode == "smooth_abs":
        S_new, stats = smooth_abs(S, g_abs, p)
    elif p.mode == "double_smooth":
        S_new, stats = double_smooth(S, g_abs, p)
    elif p.mode == "z_score":
        S_new, stats = z_score(S, g_abs, p)
    elif p.mode == "robust_z":
        S_new, stats = robust_z(S, g_abs, p)
    else:
        S_new, stats = gd(S, normalise(g, p.grad_norm), p)
    S_new = preserve_energy(S, S_new.clamp_min(p.sigma_clip_min), p.preserve_energy)
    return S_new, stats
