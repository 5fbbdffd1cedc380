"""Exact g_k = ∂L/∂σ_k for every edited module, in one backward pass per calibration batch.

Each edited LoRA module is re-parametrised for the duration of calibration: its `lora_B.weight`
becomes U·diag(σ)/s and its `lora_A.weight` becomes Vh (both from the compact SVD), so that
s·B·A = U·diag(σ)·Vh = ΔW and PEFT's own forward (LoRA or DoRA) runs unchanged. σ is the only
leaf that requires grad: no gradient is computed for base weights or A/B, ∂L/∂W is never
materialised, and the σ gradients accumulate on the device with no host sync per module. Every
`requires_grad` flag and parametrization is restored afterwards, even on error.

DoRA: PEFT detaches the weight norm in the forward, so g is the gradient of the function PEFT
computes with the norm held constant; the magnitude vector is never edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from loraforge.packing import Batch, token_loss_sum
from loraforge.spectral.svd import Spectrum


class _Fixed(nn.Module):
    """A parametrization that ignores the stored weight and returns `value()`."""

    def __init__(self, value: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self._value = value

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self._value()


def _b_of(
    U: torch.Tensor, sigma: torch.Tensor, scale: float, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    return lambda: (U * (sigma / scale)).to(dtype)  # B(σ) = U·diag(σ)/s, (out, r)


def _a_of(Vh: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: Vh.to(dtype)  # A = Vh, (r, in)


@contextlib.contextmanager
def sigma_parametrized(
    model: nn.Module, spectra: dict[str, Spectrum], adapter: str = "default"
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, module `name`'s ΔW is U·diag(σ[name])·Vh with σ a grad-requiring leaf."""
    modules = dict(model.named_modules())
    flags = {p: p.requires_grad for p in model.parameters()}
    sigmas: dict[str, torch.Tensor] = {}
    patched: list[nn.Module] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, sp in spectra.items():
            layer = modules[name]
            lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
            device, dtype = lora_B.weight.device, lora_B.weight.dtype
            sigma = sp.S.to(device).clone().requires_grad_(True)  # (r,)
            U, Vh = sp.U.to(device), sp.Vh.to(device)  # (out, r), (r, in), fp32
            scale = sp.scale
            parametrize.register_parametrization(
                lora_B, "weight", _Fixed(_b_of(U, sigma, scale, dtype)), unsafe=True
            )
            patched.append(lora_B)
            parametrize.register_parametrization(
                lora_A, "weight", _Fixed(_a_of(Vh, dtype)), unsafe=True
            )
            patched.append(lora_A)
            sigmas[name] = sigma
        yield sigmas
    finally:
        for module in patched:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def sensitivities(
    model: nn.Module,
    spectra: dict[str, Spectrum],
    batches: Iterable[Batch],
    adapter: str = "default",
) -> tuple[dict[str, torch.Tensor], float, int]:
    """g per module (summed over all label tokens of all batches), total loss and token count."""
    model.eval()  # no dropout: the function being differentiated is the one evaluated
    total_loss, total_tokens = torch.zeros(()), 0
    with sigma_parametrized(model, spectra, adapter) as sigmas:
        for batch in batches:
            loss_sum, n = token_loss_sum(model, batch)
            loss_sum.backward()
            total_loss = total_loss + loss_sum.detach().cpu()
            total_tokens += n
        g = {
            name: s.grad.detach().cpu() if s.grad is not None else torch.zeros_like(s).cpu()
            for name, s in sigmas.items()
        }
    return g, float(total_loss), total_tokens
