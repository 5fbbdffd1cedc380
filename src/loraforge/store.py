"""The artifact store: publish a directory once, read it back verified, list what is published.

`publish(src, uri, ...)` writes every file, then `loraforge.json` last and create-only, so an
artifact appears whole or not at all and a second publish to the same URI is refused with the
first left intact. `fetch(uri)` verifies every file's size and sha256 before returning.

Two backends share that contract:
- local (`file://`, plain path): files and manifest are written into a hidden staging
  directory beside the target, which is then renamed onto it; rename(2) of a directory fails on
  a non-empty target, so exactly one publisher wins and readers never see a partial artifact.
- S3: files go under `<prefix>/.data/<attempt>/` and the manifest to `<prefix>/loraforge.json`
  with `If-None-Match: *`. Concurrent publishers never overwrite each other's files; the one
  whose manifest lands wins, and the manifest says where its files are (`data_prefix`).

A local artifact holds regular files only: a symlink found in one is refused on read (it could
point anywhere, and its target can change after the manifest was written). A full disk while
writing a local artifact or a downloaded copy is a `TransientError` (exit 75: a rerun on a
fresh volume may succeed); a read-only or forbidden location is a `PermanentError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraforge.errors import ArtifactExistsError, IntegrityError, PermanentError, TransientError
from loraforge.logs import SecretScrubber, secret_env_values
from loraforge.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    new_manifest,
    scan_directory,
    verify_file,
)
from loraforge.uri import ArtifactUri, parse_uri


@dataclass(frozen=True)
class Artifact:
    """A published artifact that has been verified: its URI, manifest and local directory."""

    uri: str
    manifest: Manifest
    manifest_bytes: bytes
    path: Path


class Backend(Protocol):
    def read_manifest(self, uri: ArtifactUri) -> bytes | None: ...
    def publish(self, src: Path, uri: ArtifactUri, manifest: Manifest) -> None: ...
    def download(self, uri: ArtifactUri, manifest: Manifest, dest: Path) -> None: ...
    def local_path(self, uri: ArtifactUri, manifest: Manifest) -> Path | None: ...
    def list_manifests(self, prefix: ArtifactUri) -> list[ArtifactUri]: ...


class LocalBackend:
    """A directory tree on a local or mounted filesystem."""

    def read_manifest(self, uri: ArtifactUri) -> bytes | None:
        if (uri.path / MANIFEST_NAME).is_symlink():
            raise IntegrityError(f"{uri}: {MANIFEST_NAME} is a symlink: {_REGULAR_ONLY}")
        return _read_or_none(uri.path / MANIFEST_NAME)

    def publish(self, src: Path, uri: ArtifactUri, manifest: Manifest) -> None:
        target = uri.path
        staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:12]}"
        try:
            with local_errors(str(uri)):
                target.parent.mkdir(parents=True, exist_ok=True)
                staging.mkdir()
                for entry in manifest.files:
                    _copy_synced(src / entry.path, staging / entry.path)
                _create_exclusive(staging / MANIFEST_NAME, manifest.to_bytes())
                _rename_noreplace(staging, target, str(uri))
                _fsync_dir(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # only ever our own, unpublished

    def download(self, uri: ArtifactUri, manifest: Manifest, dest: Path) -> None:
        for entry in manifest.files:
            (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(uri.path / entry.path, dest / entry.path)

    def local_path(self, uri: ArtifactUri, manifest: Manifest) -> Path | None:
        # always the plain layout: `data_prefix` is where an S3 original kept the files, and a
        # local copy keeps the original manifest bytes so its sha256 still names the source
        return uri.path

    def list_manifests(self, prefix: ArtifactUri) -> list[ArtifactUri]:
        root = prefix.path
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # staging, hidden
            if MANIFEST_NAME in filenames:
                found.append(ArtifactUri("file", "", dirpath))
        return found


def _copy_synced(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("xb") as fout:
        shutil.copyfileobj(fin, fout, 4 * 2**20)
        fout.flush()
        os.fsync(fout.fileno())


def _create_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _rename_noreplace(staging: Path, target: Path, uri: str) -> None:
    """Move the finished staging dir onto `target`; refused when `target` holds anything."""
    try:
        os.rename(staging, target)  # replaces only a missing or empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        if (target / MANIFEST_NAME).exists():
            raise ArtifactExistsError(
                f"{uri} is already published; nothing was written (choose another "
                "LORAFORGE_OUTPUT or LORAFORGE_RUN_ID)"
            ) from exc
        raise PermanentError(
            f"{uri} exists and is not an empty directory or an artifact; choose another "
            "LORAFORGE_OUTPUT or remove it"
        ) from exc


_REGULAR_ONLY = "artifacts hold regular files only; republish the artifact"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def local_errors(where: str) -> Iterator[None]:
    """A full disk is transient (exit 75), an unwritable place permanent (exit 2): one line."""
    try:
        yield
    except OSError as exc:
        reason = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        if exc.errno in _DISK_FULL:
            raise TransientError(
                f"{where}: no space left on the device ({reason}): free "
                "space or give the store (LORAFORGE_STORE) or cache (LORAFORGE_CACHE) a larger "
                "volume, then rerun"
            ) from exc
        if exc.errno in _NOT_WRITABLE:
            raise PermanentError(
                f"{where}: cannot write here ({reason}): point LORAFORGE_STORE / LORAFORGE_CACHE "
                "at a writable directory"
            ) from exc
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backend_for(uri: ArtifactUri, **options: Any) -> Backend:
    if uri.scheme == "s3":
        from loraforge.s3 import S3Backend  # boto3 only when S3 is used

        return S3Backend(**options)
    return LocalBackend()


def _parse(uri: str) -> ArtifactUri:
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise PermanentError(f"{uri}: {exc}") from exc


def publish(
    src: str | Path,
    uri: str,
    *,
    job: str,
    run_id: str,
    settings: dict[str, Any] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    **options: Any,
) -> Manifest:
    """Publish directory `src` as the artifact `uri`; its manifest is written last, create-only."""
    target = _parse(uri)
    backend = backend_for(target, **options)
    if backend.read_manifest(target) is not None:  # fail before uploading anything
        raise ArtifactExistsError(
            f"{uri} is already published; nothing was written (choose another LORAFORGE_OUTPUT "
            "or LORAFORGE_RUN_ID)"
        )
    files = scan_directory(Path(src))
    manifest = new_manifest(
        job, run_id, files, settings=settings or {}, inputs=inputs or [], metrics=metrics or {}
    )
    manifest = _scrubbed(manifest)
    backend.publish(Path(src), target, manifest)
    return manifest


def _scrubbed(manifest: Manifest) -> Manifest:
    """A last line of defence: no secret environment value is ever written into a manifest."""
    scrubber = SecretScrubber(secret_env_values())
    raw = manifest.to_bytes()
    clean = scrubber.scrub(raw.decode()).encode()
    return manifest if clean == raw else Manifest.from_bytes(clean, "manifest")


def read_manifest(uri: str, **options: Any) -> tuple[Manifest, bytes]:
    """The manifest of the artifact at `uri`; a prefix without one is not an artifact."""
    target = _parse(uri)
    raw = backend_for(target, **options).read_manifest(target)
    if raw is None:
        raise PermanentError(
            f"{uri}: no published artifact here (no {MANIFEST_NAME}; an interrupted publish "
            "leaves none): check the URI or rerun the job that makes it"
        )
    return Manifest.from_bytes(raw, uri), raw


def fetch(uri: str, dest: str | Path | None = None, **options: Any) -> Artifact:
    """Verify the artifact at `uri` and return it as a local directory.

    A local artifact is verified in place when `dest` is None. Otherwise (and always for S3)
    the files are downloaded into a staging directory beside `dest`, verified, then renamed
    onto it, so `dest` never holds a partial or unverified copy.
    """
    target = _parse(uri)
    backend = backend_for(target, **options)
    manifest, raw = read_manifest(uri, **options)
    if dest is None:
        local = backend.local_path(target, manifest)
        if local is not None:
            _verify_all(local, manifest, uri)
            return Artifact(uri, manifest, raw, local)
        dest = default_cache_dir() / manifest_digest(raw)
    dest = Path(dest)
    if _read_or_none(dest / MANIFEST_NAME) == raw:  # fetched before (a restarted job)
        _verify_all(dest, manifest, uri)
        return Artifact(uri, manifest, raw, dest)
    with local_errors(str(dest)), _staging_beside(dest) as staging:
        backend.download(target, manifest, staging)
        _verify_all(staging, manifest, uri)
        (staging / MANIFEST_NAME).write_bytes(raw)  # the copy is an artifact directory too
        _rename_noreplace(staging, dest, str(dest))
    return Artifact(uri, manifest, raw, dest)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _verify_all(root: Path, manifest: Manifest, uri: str) -> None:
    links = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink())
    if links:
        raise IntegrityError(f"{uri}: {links[0]} is a symlink: {_REGULAR_ONLY}")
    for entry in manifest.files:
        verify_file(root / entry.path, entry, uri)
    expected = {e.path for e in manifest.files}
    extra = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_NAME
        and p.relative_to(root).as_posix() not in expected
    ]
    if extra:
        raise IntegrityError(f"{uri}: files not in the manifest: {', '.join(sorted(extra)[:5])}")


@contextlib.contextmanager
def _staging_beside(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.fetch-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def manifest_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge"
    return Path(root) / "artifacts"


def list_artifacts(prefix: str, **options: Any) -> list[str]:
    """URIs of the published artifacts (manifest-bearing prefixes) under `prefix`, sorted."""
    target = _parse(prefix)
    found = backend_for(target, **options).list_manifests(target)
    return sorted(str(u) for u in found)


def exists(uri: str, **options: Any) -> bool:
    target = _parse(uri)
    return backend_for(target, **options).read_manifest(target) is not None


__all__ = ["Artifact", "FileEntry", "exists", "fetch", "list_artifacts", "publish", "read_manifest"]
