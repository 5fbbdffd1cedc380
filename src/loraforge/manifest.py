"""`loraforge.json`: what an artifact holds, written last; and the checks a reader makes.

A manifest lists every file of an artifact with its size and sha256, and records the job,
its (redacted) settings, its inputs with their manifests' sha256, library versions and metrics.
An artifact without one does not exist. Readers check every path is a plain relative path and
every file's size and sha256 before use.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from loraforge.errors import IntegrityError, PermanentError

MANIFEST_NAME = "loraforge.json"
FORMAT = "loraforge.artifact/v1"
MAX_MANIFEST_BYTES = 16 * 2**20
_CHUNK = 4 * 2**20
_LIBRARIES = ("loraforge", "torch", "transformers", "peft", "bitsandbytes", "datasets", "vllm")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative POSIX path inside the artifact
    size: int
    sha256: str


@dataclass
class Manifest:
    job: str
    run_id: str
    files: list[FileEntry]
    data_prefix: str = ""  # where the files lie under the artifact's prefix (S3: per attempt)
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> Manifest:
        """Parse and check a manifest read from `source` (named in every error)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{source}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(raw)
            files = [
                FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]
            ]
            manifest = cls(**{**data, "files": files})
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{source}: not a valid loraforge manifest ({exc})") from exc
        if manifest.format != FORMAT:
            raise IntegrityError(f"{source}: unknown manifest format {manifest.format!r}")
        for entry in manifest.files:
            check_relative_path(entry.path, source)
            if entry.size < 0 or len(entry.sha256) != 64:
                raise IntegrityError(f"{source}: bad size or sha256 for {entry.path}")
        check_relative_path(manifest.data_prefix or "x", source)
        return manifest


def check_relative_path(path: str, source: str) -> None:
    """Refuse absolute paths, `..`, backslashes and the reserved manifest name."""
    pure = PurePosixPath(path)
    bad = (
        not path
        or pure.is_absolute()
        or "\\" in path
        or any(part in ("..", ".", "") for part in path.rstrip("/").split("/"))
    )
    if bad:
        raise IntegrityError(f"{source}: unsafe file path {path!r} in manifest")
    if pure.name == MANIFEST_NAME:
        raise IntegrityError(
            f"{source}: {MANIFEST_NAME} is reserved and cannot be an artifact file"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_directory(root: Path) -> list[FileEntry]:
    """Entries for every file under `root`; symlinks, special files, the manifest name refused."""
    if not root.is_dir():
        raise PermanentError(f"{root}: not a directory, nothing to publish")
    entries = []
    for path in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix()
        if path.name == MANIFEST_NAME:
            raise PermanentError(f"{path}: {MANIFEST_NAME} is reserved for the manifest; rename it")
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    if not entries:
        raise PermanentError(f"{root}: empty directory, nothing to publish")
    return entries


def _walk(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_symlink():
            raise PermanentError(f"{path}: symlinks are not published; copy the file instead")
        if path.is_dir():
            continue
        if not path.is_file():
            raise PermanentError(f"{path}: not a regular file; artifacts hold regular files only")
        yield path


def verify_file(path: Path, entry: FileEntry, source: str) -> None:
    """Raise `IntegrityError` unless `path` has the entry's size and sha256."""
    size = path.stat().st_size if path.is_file() else -1
    if size != entry.size:
        raise IntegrityError(
            f"{source}/{entry.path}: size {size} != {entry.size} in manifest (truncated or "
            "replaced); republish the artifact"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise IntegrityError(
            f"{source}/{entry.path}: sha256 {digest[:12]}… != {entry.sha256[:12]}… in manifest "
            "(corrupted); republish the artifact"
        )


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact (read without importing them)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def new_manifest(job: str, run_id: str, files: list[FileEntry], **extra: Any) -> Manifest:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Manifest(job, run_id, files, versions=library_versions(), created=created, **extra)


def input_record(uri: str, manifest_bytes: bytes | None) -> Mapping[str, Any]:
    """How a manifest names an input: its URI and, for artifacts, its manifest's sha256."""
    digest = hashlib.sha256(manifest_bytes).hexdigest() if manifest_bytes is not None else None
    return {"uri": uri, "manifest_sha256": digest}
