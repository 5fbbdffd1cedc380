"""Adapters to score, read and checked before any engine starts.

An adapter is a published artifact holding a PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`); `store.fetch` verifies every file against the manifest. Pickled
weights (`.bin`, `.pt`) are refused. `base` stands for the base model with no adapter.

`fetch` also reads every tensor once and refuses a file PEFT would load wrongly or silently:
unreadable, non-float or non-finite values, a module with lora_A but no lora_B (or no magnitude
under DoRA), A and B of different ranks or of a rank the config does not give, tensors of modules
the config does not target (PEFT drops those with a warning).

`check_fits` compares the shapes in the safetensors header with the base's modules, and finds
the base's modules the config targets that have no tensors (PEFT would leave them at their
initialisation), so an adapter trained on another base, or cut short, fails with a message
naming the module, before generation, for either engine (vLLM's check runs on a meta-device
copy of the base: no weights loaded).
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
_LORA_A, _LORA_B, _MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
_LORA_SUFFIXES = (_LORA_A, _LORA_B, _MAGNITUDE)
_REPUBLISH = "republish the adapter from its training run (PEFT save_pretrained, safetensors)"


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
    try:
        problems = tensor_problems(artifact.path / WEIGHTS_NAME, config)
    except PermanentError as exc:  # the config itself
        raise PermanentError(f"{variable}: {uri}/{CONFIG_NAME}: {exc}") from exc
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PermanentError(f"{variable}: {uri}/{WEIGHTS_NAME}: {problems[0]}{more}: {_REPUBLISH}")
    return Adapter(uri, label, artifact.path, artifact.manifest_bytes, config)


def lora_config(config: dict[str, Any]) -> Any:
    """The `LoraConfig` of a LoRA `adapter_config.json`, for PEFT's own module matching."""
    from peft import LoraConfig

    known = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    try:
        return LoraConfig(**known)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"not a valid LoRA config ({exc})") from exc


def tensor_problems(path: Path, config: dict[str, Any]) -> list[str]:
    """What is wrong with the weights file of a LoRA/DoRA adapter (empty when nothing is)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # module -> suffix -> shape
    problems = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  # a safe_open handle is not a dict
                tensor = f.get_tensor(key)
                problems += _value_problems(key, tensor)
                suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
                if suffix is not None:
                    name = key.removeprefix(_PREFIX).removesuffix(suffix)
                    shapes.setdefault(name, {})[suffix] = tuple(tensor.shape)
                elif not (config.get("modules_to_save") or config.get("lora_bias")):
                    problems.append(f"{key} is not a LoRA tensor (lora_A, lora_B, magnitude)")
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return [f"not a readable safetensors file ({first})"]
    if config.get("peft_type") != "LORA":
        return problems  # other PEFT types: PEFT's own loading checks them
    if not shapes:
        return [*problems, "no LoRA tensors at all"]
    cfg = lora_config(config)
    for name, parts in sorted(shapes.items()):
        problems += _module_problems(name, parts, cfg)
    return problems


def _value_problems(key: str, tensor: torch.Tensor) -> list[str]:
    if not tensor.is_floating_point():
        return [f"{key} is {tensor.dtype}, not a floating-point tensor"]
    if not bool(torch.isfinite(tensor).all()):
        return [f"{key} holds NaN or infinite values"]
    return []


def _module_problems(name: str, parts: dict[str, tuple[int, ...]], cfg: Any) -> list[str]:
    """A module's A, B (and DoRA magnitude) against each other and the config."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    A, B, m = parts.get(_LORA_A), parts.get(_LORA_B), parts.get(_MAGNITUDE)
    if not check_target_module_exists(cfg, name):
        return [f"{name} has tensors but adapter_config.json does not target it"]
    if A is None or B is None:
        have, lack = ("lora_B", "lora_A") if A is None else ("lora_A", "lora_B")
        return [f"{name} has {have} but no {lack}"]
    if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
        return [f"{name}: lora_A {list(A)} and lora_B {list(B)} do not share a rank"]
    pattern = dict(getattr(cfg, "rank_pattern", None) or {})
    r = int(pattern.get(get_pattern_key(list(pattern), name), cfg.r))
    if A[0] != r:
        return [f"{name} has rank {A[0]} but adapter_config.json gives it r={r}"]
    if bool(getattr(cfg, "use_dora", False)) != (m is not None):
        state = (
            "no magnitude vector, which DoRA (use_dora) needs"
            if m is None
            else ("a magnitude vector but use_dora is off")
        )
        return [f"{name} has {state}"]
    if m is not None and m != (B[0],):
        return [f"{name}: magnitude {list(m)} does not match lora_B's {B[0]} output features"]
    return []


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
    shapes = saved_shapes(adapter)
    for key, shape in shapes.items():
        problem = _misfit(key.removeprefix(_PREFIX), shape, modules, params)
        if problem:
            made_for = adapter.config.get("base_model_name_or_path") or "another model"
            raise PermanentError(
                f"{variable}: {adapter.uri} does not fit LORAFORGE_BASE_MODEL="
                f"{base_name}: {problem} (the adapter was made for {made_for}): score it with "
                "the base it was trained on"
            )
    missing = _untrained_targets(adapter, modules, {k.removeprefix(_PREFIX) for k in shapes})
    if missing:
        raise PermanentError(
            f"{variable}: {adapter.uri}/{WEIGHTS_NAME} has no tensors for {missing[0]}"
            f"{f' and {len(missing) - 1} more modules' if len(missing) > 1 else ''}, which "
            f"{CONFIG_NAME} targets (PEFT would leave them untrained): {_REPUBLISH}"
        )


def _untrained_targets(
    adapter: Adapter, modules: dict[str, torch.nn.Module], keys: set[str]
) -> list[str]:
    """The base's linear modules the LoRA config targets that have no lora_A in the file."""
    if adapter.config.get("peft_type") != "LORA":
        return []
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = lora_config(adapter.config)
    return [
        name
        for name, module in modules.items()
        if hasattr(module, "in_features")
        and f"{name}{_LORA_A}" not in keys
        and check_target_module_exists(cfg, name)
    ]


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

    from loraforge.modeling import refuse_remote_code

    config = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=False)
    refuse_remote_code(config, model_path, "config")
    with torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=False
        )
    return model
