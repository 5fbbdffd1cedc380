"""The calibrate-and-edit job (`loraforge-edit`): adapter -> sensitivities -> edited adapter.

settings -> fetch and check the adapter (safetensors only) -> base + adapter -> compact SVD of
every selected module -> exact g = ∂L/∂σ on calibration data (answer tokens only, the eval's
`Question: …\\nAnswer:` layout) -> σ' by the edit mode -> B', A' at the same rank and scale ->
publish a new adapter artifact with `spectral_edit_meta.json` and a spectrum plot. The input
artifact is read only; the output is a new prefix, create-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loraforge import adapters, data, store
from loraforge.adapters import CONFIG_NAME as ADAPTER_CONFIG
from loraforge.adapters import WEIGHTS_NAME as ADAPTER_WEIGHTS
from loraforge.errors import PermanentError
from loraforge.manifest import input_record, library_versions
from loraforge.modeling import (
    base_model_path,
    load_base_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from loraforge.packing import Batch, collate_padded
from loraforge.runner import JobContext, job_main
from loraforge.settings import EditSettings
from loraforge.spectral.modes import edit_sigma
from loraforge.spectral.params import EditParams
from loraforge.spectral.sensitivity import sensitivities
from loraforge.spectral.svd import Spectrum, compact_svd, rebuild

log = logging.getLogger("loraforge.edit")

META = "spectral_edit_meta.json"
PLOT = "spectrum.png"
META_FORMAT = "loraforge.spectral_edit/v1"
# every EditParams field the settings expose (the fallback thresholds keep the seed's values)
_PARAM_FIELDS = [
    f
    for f in EditParams.__dataclass_fields__
    if f in EditSettings.model_fields and f not in ("mode", "seed")
]


def edit_params(settings: EditSettings) -> EditParams:
    values = {name: getattr(settings, name) for name in _PARAM_FIELDS}
    return EditParams(mode=settings.edit_mode, seed=settings.seed, **values)


def calibration_sample(settings: EditSettings) -> list[dict[str, Any]]:
    """N records drawn with the seed (the seed's first-N-rows habit biases towards easy items)."""
    records = data.read_records(settings.calib_data, variable="LORAFORGE_CALIB_DATA")
    count = min(settings.calib_samples, len(records))
    return random.Random(settings.seed).sample(records, count)


def calibration_batches(
    settings: EditSettings, tokenizer: Any, records: list[dict[str, Any]], device: torch.device
) -> list[Batch]:
    examples = data.tokenize(records, tokenizer, settings.max_seq_len, settings.calib_data)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    size = settings.calib_batch_size
    return [
        collate_padded(examples[i : i + size], int(pad)).to(device)
        for i in range(0, len(examples), size)
    ]


def _layer_of(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def select_modules(model: torch.nn.Module, settings: EditSettings) -> dict[str, torch.nn.Module]:
    """The adapter's LoRA modules in scope: target short names within the layer range."""
    adapted = {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }
    present = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    missing = [t for t in settings.target_modules if t not in present]
    if missing:
        raise PermanentError(
            f"LORAFORGE_TARGET_MODULES: {', '.join(missing)} not adapted by {settings.adapter}; "
            f"its adapted modules are {', '.join(present)}"
        )
    span = settings.layer_range()
    chosen = {
        name: m
        for name, m in adapted.items()
        if name.rsplit(".", 1)[-1] in settings.target_modules
        and (
            span is None
            or (_layer_of(name) is not None and span[0] <= (_layer_of(name) or 0) <= span[1])
        )
    }
    if not chosen:
        raise PermanentError(f"LORAFORGE_LAYERS={settings.layers}: no adapted module in range")
    return chosen


def spectra_of(modules: dict[str, torch.nn.Module]) -> dict[str, Spectrum]:
    """Compact SVD per module with PEFT's resolved scale (α/r or α/√r, patterns applied)."""
    result = {}
    for name, module in modules.items():
        B = module.lora_B["default"].weight  # type: ignore[index,union-attr]  # (out, r)
        A = module.lora_A["default"].weight  # type: ignore[index,union-attr]  # (r, in)
        scale = float(module.scaling["default"])  # type: ignore[index]
        result[name] = compact_svd(B, A, scale)
    return result


@dataclass
class EditResult:
    spectra: dict[str, Spectrum]
    g: dict[str, torch.Tensor]
    sigma_new: dict[str, torch.Tensor]
    stats: dict[str, dict[str, Any]]
    calib_loss: float
    calib_tokens: int


def edit_spectra(
    spectra: dict[str, Spectrum], g: dict[str, torch.Tensor], params: EditParams
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    sigma_new, stats = {}, {}
    for name, sp in spectra.items():
        sigma_new[name], stats[name] = edit_sigma(sp.S, g[name], params, key=name)
    return sigma_new, stats


def write_adapter(src: Path, dst: Path, result: EditResult) -> None:
    """The input's config byte for byte; weights with the edited modules' A and B replaced."""
    (dst / ADAPTER_CONFIG).write_bytes((src / ADAPTER_CONFIG).read_bytes())
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    for name, sp in result.spectra.items():
        key_B, key_A = f"{name}.lora_B.weight", f"{name}.lora_A.weight"
        if key_B not in tensors or key_A not in tensors:
            raise PermanentError(f"{src}: no tensors {key_A}/{key_B} for module {name}")
        B_new, A_new = rebuild(sp, result.sigma_new[name], tensors[key_B].dtype)
        tensors[key_B], tensors[key_A] = B_new.contiguous(), A_new.contiguous()
    save_file(tensors, str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def records_digest(records: list[dict[str, Any]]) -> str:
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()


def build_meta(
    settings: EditSettings,
    result: EditResult,
    params: EditParams,
    adapter: adapters.Adapter,
    records: list[dict[str, Any]],
    dora: bool,
) -> dict[str, Any]:
    """Everything needed to replay the edit: parameters, inputs' hashes, σ, g and σ' per module."""
    modules = {
        name: {
            "scale": sp.scale,
            "rank": int(sp.S.numel()),
            "sigma": sp.S.tolist(),
            "g": result.g[name].tolist(),
            "sigma_new": result.sigma_new[name].tolist(),
            "stats": result.stats[name],
        }
        for name, sp in result.spectra.items()
    }
    return {
        "format": META_FORMAT,
        "params": params.as_dict(),
        "settings": settings.redacted(),
        "input_adapter": {
            "uri": settings.adapter,
            "manifest_sha256": store.manifest_digest(adapter.manifest_bytes or b""),
        },
        "calibration": {
            "uri": settings.calib_data,
            "samples": len(records),
            "records_sha256": records_digest(records),
            "seed": settings.seed,
            "loss_sum": result.calib_loss,
            "label_tokens": result.calib_tokens,
        },
        "dora": dora,
        "dora_note": (
            "DoRA adapter: the edit acts on the direction (lora_A, lora_B); the "
            "magnitude vector is kept unchanged"
        )
        if dora
        else None,
        "versions": library_versions(),
        "modules": modules,
    }


def replay(meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """σ' of every module recomputed from the meta alone (σ, g and the parameters)."""
    params = EditParams(**meta["params"])
    return {
        name: edit_sigma(
            torch.tensor(m["sigma"], dtype=torch.float32),
            torch.tensor(m["g"], dtype=torch.float32),
            params,
            key=name,
        )[0]
        for name, m in meta["modules"].items()
    }


def plot_spectra(result: EditResult, path: Path, max_modules: int = 12) -> None:
    """σ before and after for up to `max_modules` modules, one small panel each."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    names = list(result.spectra)[:max_modules]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(result.spectra[name].S.numpy(), "o-", ms=3, label="σ")
        ax.plot(result.sigma_new[name].numpy(), "s--", ms=3, label="σ'")
        ax.set_title(name.removeprefix("base_model.model.model."), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute_edit(
    settings: EditSettings, adapter: adapters.Adapter
) -> tuple[EditResult, list[dict[str, Any]], bool]:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    path = base_model_path(settings)
    tokenizer = load_tokenizer(path, settings)
    records = calibration_sample(settings)
    batches = calibration_batches(settings, tokenizer, records, device)
    base = load_base_model(path, settings, device, dtype, settings.quantization)
    adapters.check_fits(adapter, base, settings.base_model, variable="LORAFORGE_ADAPTER")
    assert adapter.path is not None  # adapters.fetch never returns `base` here
    model = PeftModel.from_pretrained(base, str(adapter.path), is_trainable=False)
    modules = select_modules(model, settings)
    spectra = spectra_of(modules)
    started = time.monotonic()
    g, loss, tokens = sensitivities(model, spectra, batches)
    log.info(
        f"sensitivities of {len(spectra)} modules from {len(records)} examples "
        f"({tokens} answer tokens) in {time.monotonic() - started:.1f}s",
        extra={"event": "calibrated", "modules": len(spectra), "tokens": tokens},
    )
    sigma_new, stats = edit_spectra(spectra, g, edit_params(settings))
    dora = bool(getattr(model.peft_config["default"], "use_dora", False))
    return EditResult(spectra, g, sigma_new, stats, loss, tokens), records, dora


def run(settings: EditSettings, ctx: JobContext) -> None:
    if store.exists(settings.output_uri):
        log.info(f"{settings.output_uri} is already published: nothing to do")
        return
    adapter = adapters.fetch(settings.adapter, "adapter", variable="LORAFORGE_ADAPTER")
    result, records, dora = compute_edit(settings, adapter)
    meta = build_meta(settings, result, edit_params(settings), adapter, records, dora)
    changed = sum(int((result.sigma_new[n] != sp.S).any()) for n, sp in result.spectra.items())
    with tempfile.TemporaryDirectory(prefix="loraforge-edit-") as tmp:
        out = Path(tmp)
        assert adapter.path is not None
        write_adapter(adapter.path, out, result)
        (out / META).write_text(json.dumps(meta, indent=1))
        plot_spectra(result, out / PLOT)
        inputs = [
            dict(input_record(settings.adapter, adapter.manifest_bytes)),
            dict(input_record(settings.base_model, None), revision=settings.base_revision),
            {"uri": settings.calib_data, "records_sha256": meta["calibration"]["records_sha256"]},
        ]
        metrics = {
            "modules_edited": len(result.spectra),
            "modules_changed": changed,
            "calib_loss": result.calib_loss / max(result.calib_tokens, 1),
            "calib_tokens": result.calib_tokens,
            "mode": settings.edit_mode,
        }
        store.publish(
            out,
            settings.output_uri,
            job="edit",
            run_id=settings.run_id,
            settings=settings.redacted(),
            inputs=inputs,
            metrics=metrics,
        )
    log.info(
        f"edited adapter published: {settings.output_uri}",
        extra={"event": "published", "uri": settings.output_uri, **metrics},
    )


def main() -> None:
    job_main(EditSettings, run)
