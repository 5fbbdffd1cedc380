"""Compact SVD of a LoRA update ΔW = s·B·A without forming ΔW, and its inverse.

With B (out, r) and A (r, in): B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), so
ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the small r x r core M = s·R_B R_Aᵀ = U_M Σ V_Mᵀ
gives ΔW = (Q_B U_M) Σ (Q_A V_M)ᵀ. Cost O((out + in)·r²) instead of O(out·in·min(out, in)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """ΔW = U · diag(S) · Vhᵀ... precisely ΔW = U @ diag(S) @ Vh, at the adapter's rank r."""

    U: torch.Tensor  # (out, r), orthonormal columns
    S: torch.Tensor  # (r,), descending, >= 0: singular values of ΔW (scale included)
    Vh: torch.Tensor  # (r, in), orthonormal rows
    scale: float  # s = alpha/r or alpha/sqrt(r): kept unchanged in the edited adapter


def compact_svd(B: torch.Tensor, A: torch.Tensor, scale: float) -> Spectrum:
    """SVD of s·B·A in fp32 (upcast: linalg.qr/svd have no half-precision kernels)."""
    B32, A32 = B.detach().float(), A.detach().float()
    Q_B, R_B = torch.linalg.qr(B32)  # (out, r), (r, r)
    Q_A, R_A = torch.linalg.qr(A32.T)  # (in, r), (r, r)
    core = scale * (R_B @ R_A.T)  # (r, r)
    U_M, S, Vh_M = torch.linalg.svd(core)
    return Spectrum(U=Q_B @ U_M, S=S, Vh=Vh_M @ Q_A.T, scale=scale)


def rebuild(
    spectrum: Spectrum, S_new: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """B', A' with s·B'·A' = U·diag(S_new)·Vh, split evenly: B' = U·√(S/s), A' = √(S/s)·Vh."""
    root = torch.sqrt(S_new.float().clamp_min(0) / spectrum.scale)  # (r,)
    B_new = spectrum.U * root  # (out, r)
    A_new = root[:, None] * spectrum.Vh  # (r, in)
    return B_new.to(dtype), A_new.to(dtype)
