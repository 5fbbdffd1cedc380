"""Training checkpoints as artifacts: adapter, AdamW state, schedule, RNG and data position.

Everything is stored without pickle: tensors in safetensors, the rest in JSON. A checkpoint is
published to `<checkpoints>/step-<N>` through the store (manifest last, create-only), so a
checkpoint interrupted mid-upload does not exist. Resume takes the newest one that verifies and
was made with the same training-relevant settings.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from loraforge import store
from loraforge.errors import PermanentError
from loraforge.settings import TrainSettings

log = logging.getLogger("loraforge.checkpoint")
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng_state.safetensors"
ADAPTER_DIR = "adapter"
# Settings that change the result: a checkpoint made with others cannot be resumed from.
FINGERPRINT_FIELDS = (
    "base_model",
    "base_revision",
    "data",
    "val_data",
    "val_fraction",
    "method",
    "rank",
    "alpha",
    "rslora",
    "dropout",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "quantization",
    "precision",
    "packing",
    "max_seq_len",
    "micro_batch_size",
    "grad_accum",
    "max_steps",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "seed",
)


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps."""

    step: int = 0
    tokens_seen: int = 0
    train_loss: float | None = None  # mean of recent_losses
    val_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)  # the last steps' losses
    python_rng: Any = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


def fingerprint(settings: TrainSettings) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    return {name: data[name] for name in FINGERPRINT_FIELDS}


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for name, value in slots.items()
    }
    return tensors, state["param_groups"]


def save(
    directory: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    full: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint directory (published by the caller). `full`: the adapter's and the
    optimizer's whole state when the model is sharded (loraforge.distributed.gather)."""
    weights, optim = full if full is not None else (None, optimizer.state_dict())
    model.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True, state_dict=weights)
    tensors, groups = _optimizer_tensors(optim)
    save_file(tensors, str(directory / OPTIMIZER))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, str(directory / RNG))
    state.python_rng = random.getstate()
    payload = {"state": asdict(state), "param_groups": groups}
    (directory / STATE).write_text(json.dumps(payload, indent=1))


def restore(directory: Path, model: PeftModel, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load a verified checkpoint directory into `model` and `optimizer`; returns its state."""
    payload = json.loads((directory / STATE).read_text())
    adapter = load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise PermanentError(f"{directory}: checkpoint adapter does not fit the model")
    tensors = load_file(str(directory / OPTIMIZER))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": payload["param_groups"]})
    rng = load_file(str(directory / RNG))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        )
    state = TrainState(**payload["state"])
    if state.python_rng is not None:
        random.setstate(_as_tuple(state.python_rng))
    return state


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def checkpoint_uri(root: str, step: int) -> str:
    return f"{root.rstrip('/')}/step-{step:08d}"


def _step_of(uri: str) -> int:
    match = re.search(r"step-(\d+)$", uri)
    return int(match.group(1)) if match else -1


def newest_verified(root: str, settings: TrainSettings) -> store.Artifact | None:
    """The newest checkpoint under `root` that verifies; None when there is none."""
    for uri in sorted(store.list_artifacts(root), key=_step_of, reverse=True):
        try:
            artifact = store.fetch(uri)
        except PermanentError as exc:  # damaged: fall back to an older one
            log.warning(f"skipping checkpoint {uri}: {exc}")
            continue
        made_with = json.loads((artifact.path / STATE).read_text())["state"]["fingerprint"]
        if made_with != fingerprint(settings):
            changed = sorted(k for k in made_with if made_with.get(k) != fingerprint(settings)[k])
            raise PermanentError(
                f"{uri} was made with other settings ({', '.join(changed)}): resume with the "
                "same settings, or start a new run (LORAFORGE_RUN_ID or LORAFORGE_CHECKPOINTS)"
            )
        return artifact
    return None
