"""Spectral numerics against slow references: compact vs dense SVD, each mode by hand."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.spectral.modes import counts, edit_sigma
from loraforge.spectral.params import EditParams
from loraforge.spectral.svd import compact_svd, rebuild


@pytest.mark.parametrize(("out", "inp", "r", "scale"), [(96, 64, 8, 0.5), (32, 200, 16, 2.0)])
def test_compact_svd_equals_dense_svd(out: int, inp: int, r: int, scale: float) -> None:
    torch.manual_seed(0)
    B, A = torch.randn(out, r), torch.randn(r, inp)
    spectrum = compact_svd(B, A, scale)
    dense = torch.linalg.svdvals(scale * B.double() @ A.double())[:r].float()
    assert torch.allclose(spectrum.S, dense, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        spectrum.U @ torch.diag(spectrum.S) @ spectrum.Vh, scale * B @ A, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(spectrum.U.T @ spectrum.U, torch.eye(r), atol=1e-5, rtol=0)
    B_new, A_new = rebuild(spectrum, spectrum.S, torch.float32)
    torch.testing.assert_close(scale * B_new @ A_new, scale * B @ A, rtol=1e-4, atol=1e-4)


def test_rebuild_splits_the_square_root_evenly_and_casts() -> None:
    torch.manual_seed(1)
    spectrum = compact_svd(torch.randn(20, 4), torch.randn(4, 12), 0.25)
    S_new = spectrum.S * torch.tensor([2.0, 1.0, 0.5, 0.0])
    B_new, A_new = rebuild(spectrum, S_new, torch.bfloat16)
    assert B_new.dtype == A_new.dtype == torch.bfloat16
    norms_B, norms_A = B_new.float().norm(dim=0), A_new.float().norm(dim=1)
    torch.testing.assert_close(norms_B, norms_A, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(norms_B**2 * 0.25, S_new, rtol=2e-2, atol=1e-3)


SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
G = torch.tensor([0.1, -2.0, 0.5, 0.05, 1.0])  # |g| order: 1, 4, 2, 0, 3
G_ABS_NORM = [abs(x) / (sum(abs(v) for v in G.tolist()) / 5) for x in G.tolist()]


def l1(sigma_new: list[float]) -> list[float]:
    factor = float(SIGMA.sum()) / sum(sigma_new)
    return [s * factor for s in sigma_new]


def check(mode: str, expected: list[float], **params: object) -> None:
    got, _ = edit_sigma(SIGMA, G, EditParams(mode=mode, **params), key="m")  # type: ignore[arg-type]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_counts_follow_the_seed_rounding() -> None:
    assert counts(5, EditParams()) == (1, 1)
    assert counts(16, EditParams()) == (3, 3)
    assert counts(2, EditParams(core_frac=0.0, noise_frac=0.9)) == (1, 1)


def test_abs_select_by_hand() -> None:
    # core: index 1 (largest |g|) x1.25; noise: index 3 (smallest |g|) x0.8; then l1 rescale
    check("abs_select", l1([4.0, 3.75, 2.0, 0.8, 0.5]))


def test_abs_select_without_energy_rescale_by_hand() -> None:
    check("abs_select", [4.0, 3.75, 2.0, 0.8, 0.5], preserve_energy="none")


def test_identity_parameters_leave_sigma_unchanged_in_every_mode() -> None:
    for mode in (
        "abs_select",
        "smooth_abs",
        "double_smooth",
        "z_score",
        "robust_z",
        "random_index",
    ):
        check(mode, SIGMA.tolist(), amp=1.0, sup=1.0, mid=1.0)


def test_random_index_keeps_counts_and_is_seeded_per_module() -> None:
    params = EditParams(mode="random_index", preserve_energy="none")
    first, stats = edit_sigma(SIGMA, G, params, key="layers.0.o_proj")
    again, _ = edit_sigma(SIGMA, G, params, key="layers.0.o_proj")
    assert torch.equal(first, again)
    ratios = sorted((first / SIGMA).tolist())
    assert ratios == pytest.approx([0.8, 1.0, 1.0, 1.0, 1.25])
    assert len(stats["core"]) == 1 and len(stats["noise"]) == 1


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _quantile(values: list[float], q: float) -> float:  # linear interpolation, as torch.quantile
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def test_smooth_abs_by_hand() -> None:
    x = G_ABS_NORM
    spread = _quantile(x, 0.8) - _quantile(x, 0.2)
    tau = 0.35 * spread
    share = (1.0 - 0.8) / (1.25 - 0.8)
    mu = _quantile(x, 0.5) - tau * math.log(share / (1 - share))
    gate = [0.8 + 0.45 * _sig((v - mu) / tau) for v in x]
    check("smooth_abs", l1([s * g for s, g in zip(SIGMA.tolist(), gate, strict=True)]))


def test_double_smooth_by_hand() -> None:
    x = G_ABS_NORM
    t_noise, t_core = _quantile(x, 0.2), _quantile(x, 0.8)
    tau = 0.35 * (max(x) - min(x))
    gate = [1.0 - 0.2 * _sig((t_noise - v) / tau) + 0.25 * _sig((v - t_core) / tau) for v in x]
    check("double_smooth", l1([s * g for s, g in zip(SIGMA.tolist(), gate, strict=True)]))


def _z_gate(z: float, high: float, low: float, tau: float) -> float:
    return 1.0 + 0.25 * _sig((z - high) / tau) - 0.2 * _sig((low - z) / tau)


def test_z_score_by_hand() -> None:
    x = G_ABS_NORM
    mean = sum(x) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / len(x))
    gate = [_z_gate((v - mean) / std, 1.0, -0.5, 0.2) for v in x]
    check("z_score", l1([s * g for s, g in zip(SIGMA.tolist(), gate, strict=True)]))


def test_robust_z_by_hand() -> None:
    x = G_ABS_NORM
    median = sorted(x)[2]
    mad = sorted(abs(v - median) for v in x)[2] * 1.4826
    gate = [_z_gate((v - median) / mad, 1.0, -0.5, 0.2) for v in x]
    check("robust_z", l1([s * g for s, g in zip(SIGMA.tolist(), gate, strict=True)]))


def test_gd_asymmetric_multiplicative_by_hand() -> None:
    g_norm = [v / (sum(abs(w) for w in G.tolist()) / 5) for v in G.tolist()]
    step = [2.0 * v if v > 0 else 0.2 * v for v in g_norm]
    check("gd", l1([s * math.exp(-d) for s, d in zip(SIGMA.tolist(), step, strict=True)]))


def test_gd_symmetric_additive_with_clip_by_hand() -> None:
    g_norm = [v / (sum(abs(w) for w in G.tolist()) / 5) for v in G.tolist()]
    expected = [max(s - 0.2 * v, 0.1) for s, v in zip(SIGMA.tolist(), g_norm, strict=True)]
    check(
        "gd",
        expected,
        asymmetric=False,
        update_mode="additive",
        sigma_clip_min=0.1,
        preserve_energy="none",
    )


def test_l2_energy_is_preserved() -> None:
    got, _ = edit_sigma(SIGMA, G, EditParams(preserve_energy="l2"))
    assert float(torch.linalg.norm(got)) == pytest.approx(float(torch.linalg.norm(SIGMA)))
