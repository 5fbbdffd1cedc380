"""Base model, tokenizer and adapter for the jobs: loaded safely, placed, quantized, adapted.

`trust_remote_code` is always False; weights load from safetensors only. A model or tokenizer
whose config has `auto_map` (custom modelling code) is refused: transformers would otherwise
load the built-in class of the same `model_type` in its place without a word. The base may be a hub
id (with `LORAFORGE_BASE_REVISION`), a local directory or an `s3://` artifact (fetched and
verified through the store). `LORAFORGE_QUANTIZATION=auto` asks the same estimator the launcher
uses (`loraforge.sizing`) instead of fixed VRAM thresholds.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from loraforge import store
from loraforge.errors import PermanentError, TransientError
from loraforge.settings import JobSettings, TrainSettings
from loraforge.sizing import ModelShape, choose_quantization, estimate_train

log = logging.getLogger("loraforge.modeling")


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise PermanentError("LORAFORGE_DEVICE=cuda but no CUDA GPU is visible: use auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32  # CPU matmuls in bf16 are slow and lossy here
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("bf16", "fp16") and device.type == "cpu":
        log.warning(f"precision {precision} on the CPU is slow; fp32 is the usual choice")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def base_model_path(settings: JobSettings) -> str:
    """A local directory or hub id for `from_pretrained`; `s3://` bases are fetched and verified."""
    if settings.base_model.startswith("s3://"):
        return str(store.fetch(settings.base_model).path)
    return settings.base_model


def _load_error(name: str, path: str, exc: Exception) -> Exception:
    """A local directory that does not load is the user's to fix; the hub may be down."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    local = Path(path).exists() or path.startswith((".", "/", "~"))
    if local or "not a valid model identifier" in str(exc) or "404" in str(exc):
        return PermanentError(
            f"LORAFORGE_BASE_MODEL={name}: cannot load a model and tokenizer from it ({first}): "
            "give a hub id, a model directory (config.json, safetensors, tokenizer) or an s3:// "
            "artifact"
        )
    return TransientError(f"LORAFORGE_BASE_MODEL={name}: loading failed ({first}); rerun later")


def refuse_remote_code(config: Any, name: str, what: str) -> None:
    """PermanentError when a config (dict or transformers config) asks for custom code."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    auto_map = auto_map or getattr(config, "auto_map", None)
    if auto_map:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={name}: its {what} has auto_map ({', '.join(sorted(auto_map))}"
            "), custom modelling code that loraforge never runs (trust_remote_code is always "
            "False) and will not silently replace with a built-in class: use a model whose "
            "architecture transformers ships"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise PermanentError(f"{path}: not readable JSON ({exc}): fix or replace the file") from exc
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str, settings: JobSettings) -> Tokenizer:
    for what in ("config.json", "tokenizer_config.json"):  # local: before anything loads
        refuse_remote_code(_read_json(Path(path) / what), settings.base_model, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=settings.base_revision, trust_remote_code=False
        )
    except Exception as exc:
        raise _load_error(settings.base_model, path, exc) from exc
    refuse_remote_code(tokenizer.init_kwargs, settings.base_model, "tokenizer config")
    if tokenizer.pad_token_id is None:  # the seed's fallback: pad with EOS (never a label)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(path: str) -> dict[str, Any]:
    """`config.json` as data, for sizing; empty when it is not a local directory."""
    return _read_json(Path(path) / "config.json")


def resolve_quantization(settings: TrainSettings, device: torch.device, path: str) -> str:
    if settings.quantization != "auto":
        return settings.quantization
    if device.type != "cuda":
        return "none"
    config = model_config(path)
    if not config:
        return "none"
    vram = torch.cuda.get_device_properties(device).total_memory
    tokens = settings.micro_batch_size * settings.max_seq_len
    try:
        chosen = choose_quantization(
            config,
            vram,
            rank=settings.rank,
            targets=settings.target_modules,
            tokens_per_micro_batch=tokens,
        )
    except ValueError as exc:
        raise PermanentError(f"LORAFORGE_QUANTIZATION=auto: {exc}") from exc
    log.info(f"quantization auto -> {chosen} for {vram / 2**30:.0f} GiB of VRAM")
    return chosen


def resolve_checkpointing(
    settings: TrainSettings, device: torch.device, path: str, quantization: str
) -> bool:
    """`auto`: recompute activations only on a GPU where the estimate without it does not fit."""
    if settings.gradient_checkpointing != "auto":
        return settings.gradient_checkpointing == "on"
    config = model_config(path)
    if device.type != "cuda" or not config:
        return False
    vram = torch.cuda.get_device_properties(device).total_memory
    estimate = estimate_train(
        ModelShape.from_config(config),
        quantization=quantization,  # type: ignore[arg-type]
        rank=settings.rank,
        targets=settings.target_modules,
        tokens_per_micro_batch=settings.micro_batch_size * settings.max_seq_len,
        checkpointing=False,
    )
    return estimate.peak > 0.9 * vram


def _bnb_config(quantization: str, dtype: torch.dtype, device: torch.device) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise PermanentError(
            f"LORAFORGE_QUANTIZATION={quantization} needs bitsandbytes, which is not importable "
            f"on this {device.type} machine ({exc}): install it or set LORAFORGE_QUANTIZATION=none"
        ) from exc
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def attention_backend(packing: bool, device: torch.device, config: dict[str, Any]) -> str:
    """Attention for training: sequence-isolating varlen kernels when packing, else sdpa.

    Packed rows under sdpa need a (T, T) block mask: quadratic work and memory that makes packing
    slower than padding (measured 0.75x on CPU). Varlen attention runs each packed sequence on its
    own: flash-attention's varlen path on a GPU where installed, `VARLEN_SDPA` otherwise. Sliding-
    window models fall back to sdpa with the block mask.
    """
    if not packing:
        return "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    if config.get("use_sliding_window"):
        return "sdpa"
    from loraforge.packing import VARLEN_SDPA  # registers the backend with transformers

    return VARLEN_SDPA


def load_base_model(
    path: str,
    settings: JobSettings,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {
        "revision": settings.base_revision,
        "trust_remote_code": False,
        "use_safetensors": True,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
    }
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, dtype, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise _load_error(settings.base_model, path, exc) from exc
    refuse_remote_code(model.config, settings.base_model, "config")  # a hub model's, too
    if quantization == "none":
        model.to(device)  # type: ignore[arg-type]
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the model's linear layers that an adapter can target (lm_head excluded)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if _is_linear(module) and not name.endswith("lm_head")
    }
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in (
        "Linear4bit",
        "Linear8bitLt",
    )


def check_targets(model: torch.nn.Module, settings: TrainSettings) -> None:
    if settings.target_modules == ["all-linear"]:
        return
    available = linear_module_names(model)
    unknown = [t for t in settings.target_modules if t not in available]
    if unknown:
        raise PermanentError(
            f"LORAFORGE_TARGET_MODULES: {', '.join(unknown)} not in the model; its linear "
            f"modules are {', '.join(available)} (or use all-linear)"
        )
    names = [name for name, _ in model.named_modules()]
    for pattern in (*settings.rank_pattern, *settings.alpha_pattern):
        if not any(re.search(pattern, name) for name in names):
            raise PermanentError(
                f"rank/alpha pattern {pattern!r} matches no module name (e.g. {names[-3]})"
            )


def lora_config(settings: TrainSettings) -> LoraConfig:
    targets: str | list[str] = (
        "all-linear" if settings.target_modules == ["all-linear"] else settings.target_modules
    )
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int, uses float
        lora_dropout=settings.dropout,
        target_modules=targets,
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern=dict(settings.alpha_pattern),
        use_rslora=settings.rslora,
        use_dora=settings.method in ("dora", "bidora"),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model: PreTrainedModel, settings: TrainSettings) -> PeftModel:
    """A fresh adapter, initialised deterministically from the run's seed."""
    check_targets(model, settings)
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, lora_config(settings))
    # the published adapter names the base as the user gave it, not a local cache path
    peft_model.peft_config["default"].base_model_name_or_path = settings.base_model
    return peft_model
