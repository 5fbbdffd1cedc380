"""Adapters to score, read and checked before any engine starts.

An adapter is a published artifact holding a PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`); `store.fetch` verifies every file against the manifest. Pickled
weights (`.bin`, `.pt`) are refused. `base` stands for the base model with no adapter.

`check_fits` compares the shapes in the safetensors header with the base's modules, so an
adapter trained on another base fails with a message naming the module, before generation,
for either engine (vLLM's check runs on a meta-device copy of the base: no weights loaded).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge import store
from loraforge.errors import PermanentError

log = logging.getLogger("loraforge.adapters")

BASE = "base"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PREFIX = "base_model.model."  # PEFT's prefix on saved keys
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


@dataclass(frozen=True)
class Adapter:
    """One thing to score: `base`, or a verified PEFT adapter directory."""

    uri: str
    label: str  # short unique name in predictions, metrics and the report
    path: Path | None = None  # None for `base`
    manifest_bytes: bytes | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        return self.path is None

    @property
    def max_rank(self) -> int:
        ranks = [
            int(self.config.get("r", 0)),
            *map(int, self.config.get("rank_pattern", {}).values()),
        ]
        return max(ranks)

    @property
    def uses_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])


def labels_for(uris: Sequence[str]) -> list[str]:
    """The shortest path suffixes that tell the URIs apart (`train`, `edit`; `a/train`,
    `b/train`); `base` stays `base` and no adapter is called `base`."""
    parts = [uri.rstrip("/").split("/") for uri in uris]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = [
            uri if uri == BASE else "/".join(p[-k:]) for uri, p in zip(uris, parts, strict=True)
        ]
        clash = any(lab == BASE for uri, lab in zip(uris, labels, strict=True) if uri != BASE)
        if len(set(labels)) == len(labels) and not clash:
            return labels
    return list(uris)


def resolve(uris: Sequence[str]) -> list[Adapter]:
    """Fetch and check every adapter; every unusable one is named in one error."""
    adapters, problems = [], []
    for uri, label in zip(uris, labels_for(uris), strict=True):
        try:
            adapters.append(Adapter(uri, label) if uri == BASE else fetch(uri, label))
        except PermanentError as exc:
            problems.append(str(exc))
    if problems:
        raise PermanentError("; ".join(problems))
    return adapters


def fetch(uri: str, label: str, variable: str = "LORAFORGE_ADAPTERS") -> Adapter:
    artifact = store.fetch(uri)
    names = {p.name for p in artifact.path.iterdir() if p.is_file()}
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise PermanentError(
            f"{variable}: {uri} holds pickled weights ({', '.join(pickled)}), which are "
            "refused: save the adapter with safetensors (save_pretrained(safe_serialization=True))"
        )
    if CONFIG_NAME not in names or WEIGHTS_NAME not in names:
        raise PermanentError(
            f"{variable}: {uri} is not a PEFT adapter (needs {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}; has {', '.join(sorted(names)) or 'no files'})"
        )
    try:
        config = json.loads((artifact.path / CONFIG_NAME).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{variable}: {uri}/{CONFIG_NAME} is not JSON ({exc})") from exc
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise PermanentError(f"{variable}: {uri}/{CONFIG_NAME} has no peft_type")
    return Adapter(uri, label, artifact.path, artifact.manifest_bytes, config)


def vllm_obstacles(adapter: Adapter, max_rank: int = 512) -> list[str]:
    """Why vLLM cannot serve this adapter (empty when it can): vLLM serves plain LoRA only."""
    if adapter.is_base:
        return []
    config, why = adapter.config, []
    if config.get("peft_type") != "LORA":
        why.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if adapter.uses_dora:
        why.append("it is a DoRA adapter (use_dora)")
    if adapter.modules_to_save:
        why.append(
            f"it saves whole modules ({', '.join(adapter.modules_to_save)}: modules_to_save)"
        )
    if config.get("trainable_token_indices"):
        why.append("it trains token embeddings (trainable_token_indices)")
    if config.get("lora_bias"):
        why.append("it trains biases (lora_bias)")
    if adapter.max_rank > max_rank:
        why.append(f"its rank {adapter.max_rank} is above vLLM's largest ({max_rank})")
    return [f"{adapter.label}: {reason}" for reason in why]


def saved_shapes(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header (no weights read)."""
    from safetensors import safe_open

    assert adapter.path is not None
    with safe_open(str(adapter.path / WEIGHTS_NAME), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def check_fits(
    adapter: Adapter, model: torch.nn.Module, base_name: str, variable: str = "LORAFORGE_ADAPTERS"
) -> None:
    """Raise PermanentError when the adapter's tensors do not fit the base's modules."""
    if adapter.is_base:
        return
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for key, shape in saved_shapes(adapter).items():
        problem = _misfit(key.removeprefix(_PREFIX), shape, modules, params)
        if problem:
            made_for = adapter.config.get("base_model_name_or_path") or "another model"
            raise PermanentError(
                f"{variable}: {adapter.uri} does not fit LORAFORGE_BASE_MODEL="
                f"{base_name}: {problem} (the adapter was made for {made_for}): score it with "
                "the base it was trained on"
            )


def _misfit(
    key: str,
    shape: tuple[int, ...],
    modules: dict[str, torch.nn.Module],
    params: dict[str, tuple[int, ...]],
) -> str | None:
    suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
    if suffix is None:  # a whole saved module's tensor (modules_to_save): same shape as the base's
        if key in params and params[key] != shape:
            return f"{key} is {list(params[key])} in the base but {list(shape)} in the adapter"
        return None
    name = key.removesuffix(suffix)
    module = modules.get(name)
    if module is None:
        return f"the adapter targets {name}, which the base does not have"
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    expected = {
        ".lora_A.weight": (1, fan_in),
        ".lora_B.weight": (0, fan_out),
        ".lora_magnitude_vector": (0, fan_out),
    }[suffix]
    axis, size = expected
    if size is not None and shape[axis] != size:
        side = "input" if suffix == ".lora_A.weight" else "output"
        return f"{name} has {size} {side} features in the base, {shape[axis]} in the adapter"
    return None


def meta_model(model_path: str, revision: str | None) -> torch.nn.Module:
    """The base's module tree on the meta device: shapes without weights (for vLLM's checks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=False)
    with torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=False
        )
    return model
