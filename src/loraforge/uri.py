"""Artifact URIs: `s3://bucket/key/prefix`, `file:///abs/path`, or a plain local path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class ArtifactUri:
    scheme: str  # "s3" or "file"
    bucket: str  # "" for file
    key: str  # S3 key prefix without leading/trailing '/', or the absolute local path

    @property
    def path(self) -> Path:
        return Path(self.key)

    def child(self, name: str) -> ArtifactUri:
        key = f"{self.key.rstrip('/')}/{name}" if self.key else name
        return ArtifactUri(self.scheme, self.bucket, key)

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return self.key


def parse_uri(uri: str) -> ArtifactUri:
    """Parse an artifact URI; `ValueError` says what is wrong with it."""
    if not uri or not uri.strip():
        raise ValueError("empty URI: use s3://bucket/prefix or a local directory")
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if parsed.username or parsed.password or "@" in parsed.netloc:
            raise ValueError("credentials do not belong in a URI: use the AWS variables")
        if parsed.query or parsed.fragment:
            raise ValueError("S3 URIs take no query or fragment")
        if not _BUCKET.match(parsed.netloc) or ".." in parsed.netloc:
            raise ValueError(f"{parsed.netloc!r} is not a valid S3 bucket name")
        key = parsed.path.strip("/")
        if any(part in ("", ".", "..") for part in key.split("/")) and key:
            raise ValueError("S3 key has an empty, '.' or '..' segment")
        return ArtifactUri("s3", parsed.netloc, key)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"unsupported scheme {scheme}://: use s3://, file:// or a local path")
    raw = unquote(urlparse(uri).path) if uri.startswith("file://") else uri
    return ArtifactUri("file", "", str(Path(raw).expanduser().absolute()))
