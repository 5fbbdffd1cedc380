"""A base model's `config.json` for sizing: built in for the recommended models, else read from
a local directory, an `s3://` artifact or the Hugging Face hub (no torch, no weights).

The built-in table holds the published configs' shape fields, so rendering the shipped
`jobs/*.env` works offline. Shapes do not change across a published model's revisions, so the
table answers whatever LORAFORGE_BASE_REVISION says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loraforge.errors import IntegrityError, PermanentError

CONFIG_NAME = "config.json"


def _config(
    model_type: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    tied: bool,
    max_positions: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_positions,
        **extra,
    }


# Values from each model's config.json on the hub.
RECOMMENDED: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _config("qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768),
    "Qwen/Qwen2.5-1.5B-Instruct": _config("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 32768),
    "Qwen/Qwen2.5-3B-Instruct": _config("qwen2", 2048, 36, 16, 2, 11008, 151936, True, 32768),
    "Qwen/Qwen2.5-7B-Instruct": _config("qwen2", 3584, 28, 28, 4, 18944, 152064, False, 32768),
    "meta-llama/Llama-3.2-1B-Instruct": _config(
        "llama", 2048, 16, 32, 8, 8192, 128256, True, 131072, head_dim=64
    ),
    "meta-llama/Llama-3.2-3B-Instruct": _config(
        "llama", 3072, 28, 24, 8, 8192, 128256, True, 131072, head_dim=128
    ),
    "meta-llama/Llama-3.1-8B": _config("llama", 4096, 32, 32, 8, 14336, 128256, False, 131072),
    "meta-llama/Llama-3.1-8B-Instruct": _config(
        "llama", 4096, 32, 32, 8, 14336, 128256, False, 131072
    ),
    "mistralai/Mistral-7B-Instruct-v0.3": _config(
        "mistral", 4096, 32, 32, 8, 14336, 32768, False, 32768
    ),
    "google/gemma-2-2b-it": _config(
        "gemma2", 2304, 26, 8, 4, 9216, 256000, True, 8192, head_dim=256
    ),
}


def builtin(ref: str) -> dict[str, Any] | None:
    """The built-in config of a recommended hub id (hub ids are case-insensitive)."""
    for name, config in RECOMMENDED.items():
        if name.lower() == ref.strip().lower():
            return dict(config)
    return None


def read_config(ref: str, revision: str | None = None) -> dict[str, Any]:
    """`config.json` of LORAFORGE_BASE_MODEL `ref`: a hub id, a local directory or `s3://`."""
    known = builtin(ref)
    if known is not None:
        return known
    if ref.startswith("s3://"):
        return _parse(_read_s3(ref), ref)
    local = Path(ref.removeprefix("file://")).expanduser()
    if local.exists() or ref.startswith(("file://", "/", ".", "~")):
        return _parse(_read_local(local, ref), ref)
    if "://" in ref:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={ref}: unsupported scheme: give a hub id, a local directory "
            "or an s3:// URI"
        )
    return _parse(_read_hub(ref, revision), ref)


def _parse(raw: bytes, ref: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={ref}: {CONFIG_NAME} is not JSON ({exc})"
        ) from exc
    if not isinstance(config, dict):
        raise PermanentError(f"LORAFORGE_BASE_MODEL={ref}: {CONFIG_NAME} is not a JSON object")
    return config


def _read_local(path: Path, ref: str) -> bytes:
    config = path / CONFIG_NAME
    if not config.is_file():
        what = "has no config.json" if path.is_dir() else "is not a directory"
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={ref}: {path} {what}: give a model directory "
            "(config.json, safetensors, tokenizer), a hub id or an s3:// artifact"
        )
    return config.read_bytes()


def _read_s3(ref: str) -> bytes:
    """config.json of an `s3://` model artifact, checked against its manifest."""
    from loraforge import store
    from loraforge.s3 import S3Backend, s3_errors
    from loraforge.uri import parse_uri

    try:
        manifest, _ = store.read_manifest(ref)
    except PermanentError as exc:
        raise PermanentError(f"LORAFORGE_BASE_MODEL: {exc}") from exc
    entry = next((f for f in manifest.files if f.path == CONFIG_NAME), None)
    if entry is None:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={ref}: the artifact has no {CONFIG_NAME}: publish the model "
            "directory itself (`loraforge publish DIR s3://...`)"
        )
    uri = parse_uri(ref)
    data = uri.child(manifest.data_prefix) if manifest.data_prefix else uri
    with s3_errors(uri):
        body = S3Backend().client.get_object(Bucket=uri.bucket, Key=data.child(CONFIG_NAME).key)
        raw = bytes(body["Body"].read())
    if len(raw) != entry.size or hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{ref}/{CONFIG_NAME} does not match its manifest (corrupted); republish the artifact"
        )
    return raw


def _read_hub(repo_id: str, revision: str | None) -> bytes:
    """From the hub (or its local cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, etag_timeout=10)
    except LocalEntryNotFoundError as exc:  # offline, or the hub did not answer: not cached
        raise _unreachable(repo_id, exc) from exc
    except GatedRepoError as exc:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={repo_id} is gated: accept its license on the hub and set "
            "HF_TOKEN, or pass a local directory or s3:// URI"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={repo_id} (revision {revision or 'main'}): no {CONFIG_NAME} "
            "on the hub: check the id and LORAFORGE_BASE_REVISION, or pass a local directory"
        ) from exc
    except HFValidationError as exc:
        raise PermanentError(
            f"LORAFORGE_BASE_MODEL={repo_id}: neither a local directory nor a valid hub id "
            "(org/name): fix the path or the id"
        ) from exc
    except Exception as exc:  # connection and HTTP errors of many kinds
        raise _unreachable(repo_id, exc) from exc
    return Path(path).read_bytes()


def _unreachable(repo_id: str, exc: Exception) -> PermanentError:
    return PermanentError(
        f"LORAFORGE_BASE_MODEL={repo_id}: its {CONFIG_NAME} is neither cached nor readable from "
        f"the hub ({type(exc).__name__}) and it is not a built-in model: pass a local directory "
        "or an s3:// URI, or rerun where the hub is reachable"
    )
