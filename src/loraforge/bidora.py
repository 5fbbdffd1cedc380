"""BiDoRA: a PEFT DoRA adapter trained as a bi-level problem (`LORAFORGE_METHOD=bidora`).

The adapter is PEFT's own DoRA (`use_dora=True`): each adapted module holds a direction (LoRA A,
B) and a magnitude vector m, and computes m / ||W0 + s·BA||_row (the norm per output row,
detached) times (W0 + s·BA)x. So what is published is a standard DoRA adapter that
`PeftModel.from_pretrained` loads, not a full state dict.

Training alternates two levels:
- lower: `LORAFORGE_BIDORA_LOWER_STEPS` AdamW steps on the direction w = (A, B) against the
  training loss (plus the optional orthogonality regulariser), the magnitude held fixed;
- upper: `LORAFORGE_BIDORA_UPPER_STEPS` AdamW steps on m against the validation loss, through a
  hypergradient, at `LORAFORGE_BIDORA_UPPER_LR_MULT` times the learning rate.
The last `LORAFORGE_BIDORA_FINAL_FRACTION` of the steps train the direction alone, m fixed.

Hypergradient (`second_order`, DARTS-style, implemented here): with the unrolled direction
w' = w - ξ·∇w L_train(w, m), the upper objective F(m) = L_val(w', m) has the gradient
    ∇m F = ∇m L_val(w', m) - ξ·∇²_{m,w} L_train(w, m)·v,   v = ∇w' L_val(w', m),
whose Hessian-vector product is a central difference:
    ∇²_{m,w} L_train·v ≈ (∇m L_train(w + εv, m) - ∇m L_train(w - εv, m)) / (2ε),  ε = 0.01/||v||.
The perturbed direction is restored by copying the saved tensors back, so it is bit-identical
afterwards (adding and subtracting εv would not be). `first_order` is ∇m L_val(w, m) alone. The
hypergradient runs with dropout off, so the function it differentiates is deterministic.

The DoRA norm: PEFT detaches ||W0 + s·BA|| in the backward (DoRA paper, §4.3), so its gradients
treat the norm as a constant while its forward recomputes it from the current direction. Mixing
the two makes the finite differences above measure a different function from the one the
autograd terms differentiate (measured: the hypergradient was then off by 276% against a
finite-difference reference). Within one hypergradient the norm is therefore frozen at its value
for the current w (`frozen_dora_norms`): every term is then the exact derivative of one function,
F(m) with the norm held constant, matching PEFT's own backward. Freezing it also skips PEFT's
dense s·BA (out x in) in those forward passes.

The seed's defects this replaces: its "hypergradient" was only the direct gradient; its
magnitude was a norm per input column; it hard-coded the lower steps and ignored the upper
learning rate; and it wrote a full `pytorch_model.bin`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from torch import nn

from loraforge import packing
from loraforge.errors import PermanentError
from loraforge.train import Trainer

log = logging.getLogger("loraforge.bidora")

MAGNITUDE = "lora_magnitude_vector"
FD_RADIUS = 0.01  # ε·||v||: DARTS' finite-difference step


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(direction, magnitude): the trainable LoRA A/B weights and the DoRA magnitude vectors."""
    direction, magnitude = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if MAGNITUDE in name:
            magnitude.append(param)
        elif "lora_A" in name or "lora_B" in name:
            direction.append(param)
    if not magnitude:
        raise PermanentError(
            "LORAFORGE_METHOD=bidora: the adapter has no DoRA magnitude vectors (use_dora off?)"
        )
    return direction, magnitude


def orthogonality(model: nn.Module) -> torch.Tensor:
    """Σ over adapted modules of ||A·Aᵀ - I||² + ||Bᵀ·B - I||² (the paper's regulariser)."""
    total: torch.Tensor | None = None
    for module in model.modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or not isinstance(lora_B, nn.ModuleDict):
            continue
        for key in lora_A:
            A = cast(torch.Tensor, lora_A[key].weight).float()  # (r, in)
            B = cast(torch.Tensor, lora_B[key].weight).float()  # (out, r)
            eye = torch.eye(A.shape[0], device=A.device)
            term = ((A @ A.T - eye) ** 2).sum() + ((B.T @ B - eye) ** 2).sum()
            total = term if total is None else total + term
    if total is None:
        raise PermanentError("LORAFORGE_BIDORA_ORTH_REG: the model has no LoRA modules")
    return total


@contextlib.contextmanager
def frozen_dora_norms(model: nn.Module) -> Iterator[None]:
    """Within the block each DoRA layer's weight norm keeps the value of its first forward."""
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        original = layer.get_weight_norm
        held: list[torch.Tensor] = []

        def get_weight_norm(
            *args: Any, _original: Any = original, _held: list[torch.Tensor] = held, **kwargs: Any
        ) -> torch.Tensor:
            if not _held:
                _held.append(_original(*args, **kwargs).detach())
            return _held[0]

        layer.get_weight_norm = get_weight_norm
    try:
        yield
    finally:
        for layer in layers:
            del layer.get_weight_norm  # the instance attribute: the class method shows again


def mean_loss(model: nn.Module, batches: Sequence[packing.Batch]) -> torch.Tensor:
    """Cross-entropy per label token over all `batches`, as one differentiable scalar."""
    total = sum((packing.token_loss_sum(model, b)[0] for b in batches), torch.zeros(()))
    return total / max(1, sum(b.n_label_tokens for b in batches))


def lower_objective(
    model: nn.Module, batches: Sequence[packing.Batch], orth_reg: float
) -> torch.Tensor:
    loss = mean_loss(model, batches)
    return loss + orth_reg * orthogonality(model) if orth_reg > 0 else loss


def hypergradient(
    model: nn.Module,
    direction: Sequence[nn.Parameter],
    magnitude: Sequence[nn.Parameter],
    train_batches: Sequence[packing.Batch],
    val_batches: Sequence[packing.Batch],
    *,
    order: str,
    xi: float,
    orth_reg: float = 0.0,
) -> tuple[list[torch.Tensor], float]:
    """d L_val / d m (see the module docstring) and the validation loss it was taken at.

    Leaves every parameter exactly as it found it and accumulates nothing in `.grad`.
    """
    with frozen_dora_norms(model):  # first forward: at the current direction w
        was_training = model.training
        model.eval()
        saved = [p.detach().clone() for p in direction]
        try:
            if order == "first_order":
                val = mean_loss(model, val_batches)
                direct = torch.autograd.grad(val, list(magnitude))
                return [g.detach() for g in direct], float(val.detach())
            # the unrolled direction w' = w - ξ ∇w L_train(w, m)
            g_w = torch.autograd.grad(
                lower_objective(model, train_batches, orth_reg), list(direction)
            )
            with torch.no_grad():
                for p, g in zip(direction, g_w, strict=True):
                    p.sub_(g, alpha=xi)
            val = mean_loss(model, val_batches)
            grads = torch.autograd.grad(val, [*magnitude, *direction])
            direct, v = grads[: len(magnitude)], grads[len(magnitude) :]
            v_norm = math.sqrt(sum(float((g.float() ** 2).sum()) for g in v))
            if v_norm == 0.0:
                return [g.detach() for g in direct], float(val.detach())
            eps = FD_RADIUS / v_norm
            hvp = []
            for sign in (1.0, -1.0):  # w ± εv around the current (not the unrolled) direction
                with torch.no_grad():
                    for p, s, g in zip(direction, saved, v, strict=True):
                        p.copy_(s).add_(g, alpha=sign * eps)
                hvp.append(
                    torch.autograd.grad(
                        lower_objective(model, train_batches, orth_reg), list(magnitude)
                    )
                )
            hyper = [
                (d - xi * (gp - gm) / (2 * eps)).detach()
                for d, gp, gm in zip(direct, hvp[0], hvp[1], strict=True)
            ]
            return hyper, float(val.detach())
        finally:
            with torch.no_grad():
                for p, s in zip(direction, saved, strict=True):
                    p.copy_(s)  # bit-identical restore
            model.train(was_training)


class BiDoRATrainer(Trainer):
    """The train job's loop with a magnitude (upper) level after every K direction steps.

    `step` counts direction steps, so LORAFORGE_MAX_STEPS, checkpoints, resume and the learning
    rate schedule mean what they mean for LoRA and DoRA. The validation micro-batch of each
    upper step is a function of (seed, round), so a resumed run repeats the uninterrupted one.
    """

    upper_loss: float | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        self.direction, self.magnitude = split_parameters(self.model)
        s = self.settings
        return [
            {"params": self.direction, "lr_mult": 1.0},
            # decaying a magnitude towards 0 would shrink the adapted weights themselves
            {"params": self.magnitude, "lr_mult": s.bidora_upper_lr_mult, "weight_decay": 0.0},
        ]

    @property
    def search_steps(self) -> int:
        s = self.settings
        return s.max_steps - round(s.bidora_final_fraction * s.max_steps)

    def progress_metrics(self) -> dict[str, float]:
        return {} if self.upper_loss is None else {"upper_val_loss": self.upper_loss}

    def train_step(self, step: int) -> tuple[float, int]:
        s = self.settings
        self.model.train()
        batches = self.step_batches(step)
        n_labels = sum(b.n_label_tokens for b in batches)
        total = 0.0
        for batch in batches:
            loss_sum, _ = packing.token_loss_sum(self.model, batch)
            torch.autograd.backward(loss_sum / n_labels)
            total += float(loss_sum.detach())
        if s.bidora_orth_reg > 0:
            torch.autograd.backward(s.bidora_orth_reg * orthogonality(self.model))
        self._step(self.direction, step)
        if step < self.search_steps and (step + 1) % s.bidora_lower_steps == 0:
            round_ = step // s.bidora_lower_steps
            for j in range(s.bidora_upper_steps):
                self.upper_step(round_ * s.bidora_upper_steps + j, batches, step)
        return total / n_labels, sum(b.n_tokens for b in batches)

    def upper_step(self, index: int, train_batches: list[packing.Batch], step: int) -> None:
        s = self.settings
        hyper, self.upper_loss = hypergradient(
            self.model,
            self.direction,
            self.magnitude,
            train_batches,
            [self.val_batch(index)],
            order=s.bidora_hypergradient,
            xi=s.bidora_xi or s.learning_rate,
            orth_reg=s.bidora_orth_reg,
        )
        for p, g in zip(self.magnitude, hyper, strict=True):
            p.grad = g.to(p.dtype)
        self._step(self.magnitude, step)

    def _step(self, params: list[nn.Parameter], step: int) -> None:
        """An AdamW step on `params` alone: every other gradient is dropped first (AdamW skips
        parameters without one, so their moments do not move either)."""
        chosen = {id(p) for p in params}
        for p in self.direction + self.magnitude:
            if id(p) not in chosen:
                p.grad = None
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        self.set_learning_rate(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def val_batch(self, index: int) -> packing.Batch:
        s = self.settings
        per_epoch = len(packing.micro_batches(self.val_set, s.micro_batch_size, s.seed + 1, 0))
        epoch, position = divmod(index, per_epoch)
        chunk = packing.micro_batches(self.val_set, s.micro_batch_size, s.seed + 1, epoch)
        return self.collate([self.val_set[i] for i in chunk[position]])
