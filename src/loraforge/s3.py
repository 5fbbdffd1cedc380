"""S3 backend of the artifact store (AWS, SeaweedFS, MinIO, Ceph, GCS interop).

Credentials come only from the AWS chain (env, shared files, web identity, instance role);
`AWS_ENDPOINT_URL` selects an S3-compatible endpoint. Requests use botocore's standard retry
mode with bounded attempts and timeouts, and send checksums only when an operation requires
them, which S3-compatible stores that predate the 2025 checksum defaults need.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from loraforge.errors import ArtifactExistsError, PermanentError, TransientError
from loraforge.manifest import MANIFEST_NAME, Manifest
from loraforge.uri import ArtifactUri

MIB = 2**20
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "403",
}


def client_config(max_attempts: int | None = None, read_timeout: float = 60.0) -> Config:
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "6"))
    return Config(
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=10,
        read_timeout=read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else None,
    )


class S3Backend:
    def __init__(
        self,
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 16 * MIB,
        max_attempts: int | None = None,
        read_timeout: float = 60.0,
    ) -> None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # a session of its own: boto3's default session caches credentials for the process
        session = boto3.session.Session()
        self.client = session.client(
            "s3", region_name=region, config=client_config(max_attempts, read_timeout)
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
        )

    def read_manifest(self, uri: ArtifactUri) -> bytes | None:
        key = uri.child(MANIFEST_NAME).key
        with s3_errors(uri):
            try:
                return bytes(self.client.get_object(Bucket=uri.bucket, Key=key)["Body"].read())
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    return None
                raise

    def publish(self, src: Path, uri: ArtifactUri, manifest: Manifest) -> None:
        manifest.data_prefix = f".data/{uuid.uuid4().hex[:16]}"
        data = uri.child(manifest.data_prefix)
        with s3_errors(uri):
            for entry in manifest.files:
                self.client.upload_file(
                    str(src / entry.path),
                    uri.bucket,
                    data.child(entry.path).key,
                    Config=self.transfer,
                )
            try:
                self.client.put_object(
                    Bucket=uri.bucket,
                    Key=uri.child(MANIFEST_NAME).key,
                    Body=manifest.to_bytes(),
                    IfNoneMatch="*",
                    ContentType="application/json",
                )
            except ClientError as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise
                self._discard(uri.bucket, data.key)  # our own unpublished files, nobody else's
                raise ArtifactExistsError(
                    f"{uri} was published by another writer first; nothing of ours is visible "
                    "(choose another LORAFORGE_OUTPUT or LORAFORGE_RUN_ID)"
                ) from exc

    def _discard(self, bucket: str, prefix: str) -> None:
        with contextlib.suppress(BotoCoreError, ClientError):
            for key in self._keys(bucket, prefix + "/"):
                self.client.delete_object(Bucket=bucket, Key=key)

    def download(self, uri: ArtifactUri, manifest: Manifest, dest: Path) -> None:
        data = uri.child(manifest.data_prefix) if manifest.data_prefix else uri
        with s3_errors(uri):
            for entry in manifest.files:
                path = dest / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(
                    uri.bucket, data.child(entry.path).key, str(path), Config=self.transfer
                )

    def local_path(self, uri: ArtifactUri, manifest: Manifest) -> Path | None:
        return None

    def list_manifests(self, prefix: ArtifactUri) -> list[ArtifactUri]:
        start = f"{prefix.key}/" if prefix.key else ""
        with s3_errors(prefix):
            return [
                ArtifactUri("s3", prefix.bucket, key.rsplit("/", 1)[0] if "/" in key else "")
                for key in self._keys(prefix.bucket, start)
                if key.rsplit("/", 1)[-1] == MANIFEST_NAME and "/.data/" not in f"/{key}"
            ]

    def _keys(self, bucket: str, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def s3_errors(uri: ArtifactUri) -> Iterator[None]:
    """Map botocore failures to permanent (exit 2) or transient (exit 75) errors, one line each."""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise PermanentError(
            f"{uri}: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY from a Secret, or use web identity"
        ) from exc
    except ClientError as exc:
        raise _client_error(uri, exc) from exc
    except S3UploadFailedError as exc:  # boto3's transfer wraps the ClientError of an upload
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ClientError):
            raise _client_error(uri, cause) from exc
        raise TransientError(f"{uri}: S3 upload failed after retries ({exc})") from exc
    except RetriesExceededError as exc:  # a download that kept breaking off mid-object
        raise TransientError(
            f"{uri}: S3 download kept failing after retries "
            f"({getattr(exc, 'last_exception', exc)}); "
            "check the endpoint and the network, then rerun"
        ) from exc
    except BotoConnectionError as exc:
        raise TransientError(
            f"{uri}: S3 endpoint unreachable after retries ({type(exc).__name__}); "
            "check AWS_ENDPOINT_URL and the network, then rerun"
        ) from exc
    except BotoCoreError as exc:
        raise TransientError(f"{uri}: S3 request failed after retries ({exc})") from exc


def _client_error(uri: ArtifactUri, exc: ClientError) -> Exception:
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in ("NoSuchBucket",):
        return PermanentError(
            f"{uri}: bucket {uri.bucket!r} does not exist: create it or fix the URI "
            "(LORAFORGE_STORE / LORAFORGE_OUTPUT)"
        )
    if code in _AUTH_CODES or status == 403:
        return PermanentError(
            f"{uri}: S3 refused the credentials ({code}): check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or the role) and the bucket policy"
        )
    if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
        return TransientError(f"{uri}: S3 kept failing after retries ({code or status})")
    return PermanentError(f"{uri}: S3 request refused ({code or status}): {exc}")


__all__ = ["S3Backend", "client_config", "s3_errors"]
