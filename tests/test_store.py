"""The artifact store contract, run against the local-directory store and real S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from loraforge import store
from loraforge.errors import ArtifactExistsError, IntegrityError, PermanentError, TransientError
from loraforge.manifest import MANIFEST_NAME
from loraforge.uri import parse_uri

MIB = 2**20


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def adapter_files(tag: bytes = b"a") -> dict[str, bytes]:
    return {
        "adapter_config.json": b'{"r": 8, "tag": "' + tag + b'"}',
        "adapter_model.safetensors": tag * 50_000,
        "extra/notes.txt": b"notes " + tag,
    }


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store root URI on either backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def object_bytes(uri: str, rel: str) -> tuple[str, str]:
    """(bucket, key) where the published file `rel` of the S3 artifact `uri` lies."""
    manifest, _ = store.read_manifest(uri)
    parsed = parse_uri(uri)
    return parsed.bucket, parsed.child(manifest.data_prefix).child(rel).key


def overwrite_stored_file(uri: str, rel: str, data: bytes) -> None:
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        (parsed.path / rel).write_bytes(data)
    else:
        bucket, key = object_bytes(uri, rel)
        boto3.session.Session().client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def test_publish_then_fetch_returns_identical_verified_files(root: str, tmp_path: Path) -> None:
    files = adapter_files()
    src = make_dir(tmp_path / "src", files)
    uri = f"{root}/run-1/train"
    manifest = store.publish(src, uri, job="train", run_id="run-1", metrics={"loss": 1.5})

    listed = {e.path: (e.size, e.sha256) for e in manifest.files}
    assert listed == {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()}
    artifact = store.fetch(uri, tmp_path / "out")
    got = {
        p.relative_to(artifact.path).as_posix(): p.read_bytes()
        for p in artifact.path.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    assert got == files
    assert artifact.manifest.metrics == {"loss": 1.5}
    assert artifact.manifest.job == "train" and artifact.manifest.versions["loraforge"]


def test_fetch_is_idempotent_and_the_copy_is_an_artifact(root: str, tmp_path: Path) -> None:
    uri = f"{root}/run-1/train"
    store.publish(make_dir(tmp_path / "a", adapter_files()), uri, job="train", run_id="r")
    first = store.fetch(uri, tmp_path / "out")
    again = store.fetch(uri, tmp_path / "out")  # a restarted job fetches into the same place
    assert again.path == first.path == tmp_path / "out"
    assert store.fetch(str(tmp_path / "out")).manifest == first.manifest


@pytest.mark.s3
def test_s3_fetch_without_dest_uses_the_cache(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/cached"
    store.publish(make_dir(tmp_path / "a", adapter_files()), uri, job="train", run_id="r")
    artifact = store.fetch(uri)
    assert artifact.path.parent == tmp_path / "cache" / "artifacts"
    assert artifact.path.name == hashlib.sha256(artifact.manifest_bytes).hexdigest()
    assert store.fetch(uri).path == artifact.path


def test_second_publish_is_refused_and_first_stays_intact(root: str, tmp_path: Path) -> None:
    uri = f"{root}/run-1/train"
    store.publish(make_dir(tmp_path / "a", adapter_files(b"a")), uri, job="train", run_id="r")
    with pytest.raises(ArtifactExistsError, match="already published"):
        store.publish(make_dir(tmp_path / "b", adapter_files(b"b")), uri, job="train", run_id="r")
    artifact = store.fetch(uri, tmp_path / "out")
    assert (artifact.path / "adapter_model.safetensors").read_bytes() == b"a" * 50_000


@pytest.mark.parametrize(
    ("damage", "match"),
    [(b"b" * 50_000, "sha256"), (b"a" * 49_999, "size")],
    ids=["corrupted", "truncated"],
)
@pytest.mark.faults
def test_damaged_file_is_detected_on_read(
    root: str, tmp_path: Path, damage: bytes, match: str
) -> None:
    uri = f"{root}/run-1/train"
    store.publish(make_dir(tmp_path / "a", adapter_files()), uri, job="train", run_id="r")
    overwrite_stored_file(uri, "adapter_model.safetensors", damage)
    with pytest.raises(IntegrityError, match=f"adapter_model.safetensors: {match}"):
        store.fetch(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written at the destination


def test_prefix_without_manifest_is_invisible_and_refused(root: str, tmp_path: Path) -> None:
    store.publish(
        make_dir(tmp_path / "a", adapter_files()), f"{root}/done/train", job="train", run_id="r"
    )
    orphan = f"{root}/orphan/train"
    parsed = parse_uri(orphan)
    if parsed.scheme == "file":
        make_dir(parsed.path, adapter_files())
    else:
        for rel, data in adapter_files().items():
            boto3.session.Session().client("s3").put_object(
                Bucket=parsed.bucket, Key=parsed.child(rel).key, Body=data
            )
    assert store.list_artifacts(root) == [f"{root}/done/train"]
    assert not store.exists(orphan)
    with pytest.raises(PermanentError, match="no published artifact"):
        store.fetch(orphan, tmp_path / "out")


def test_listing_finds_nested_artifacts_only(root: str, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "a", adapter_files())
    for name in ("r1/train", "r1/edit", "r2/train"):
        store.publish(src, f"{root}/{name}", job="x", run_id="r")
    assert store.list_artifacts(root) == [
        f"{root}/{n}" for n in ("r1/edit", "r1/train", "r2/train")
    ]
    assert store.list_artifacts(f"{root}/r2") == [f"{root}/r2/train"]


@pytest.mark.faults
def test_concurrent_publishers_exactly_one_wins(root: str, tmp_path: Path) -> None:
    uri = f"{root}/race/train"
    outcomes: dict[bytes, str] = {}

    def publisher(tag: bytes) -> None:
        src = make_dir(tmp_path / tag.decode(), adapter_files(tag))
        try:
            store.publish(src, uri, job="train", run_id="r")
            outcomes[tag] = "won"
        except ArtifactExistsError:
            outcomes[tag] = "refused"

    threads = [threading.Thread(target=publisher, args=(t,)) for t in (b"a", b"b", b"c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [tag for tag, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1 and len(outcomes) == 3
    artifact = store.fetch(uri, tmp_path / "out")
    assert (artifact.path / "adapter_model.safetensors").read_bytes() == winners[0] * 50_000
    assert (artifact.path / "extra/notes.txt").read_bytes() == b"notes " + winners[0]


@pytest.mark.faults
def test_unsafe_manifest_paths_are_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "store" / "evil")
    store.publish(make_dir(tmp_path / "a", adapter_files()), uri, job="train", run_id="r")
    manifest_path = Path(uri) / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["files"][0]["path"] = "../../outside.txt"
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=re.escape("unsafe file path '../../outside.txt'")):
        store.fetch(uri)


@pytest.mark.faults
def test_symlinks_are_not_published(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "a", adapter_files())
    (src / "link").symlink_to(src / "adapter_config.json")
    target = tmp_path / "store" / "x"
    with pytest.raises(PermanentError, match="symlinks are not published"):
        store.publish(src, str(target), job="train", run_id="r")
    assert not target.exists()


def test_local_fetch_without_dest_verifies_in_place(tmp_path: Path) -> None:
    uri = str(tmp_path / "store" / "x")
    store.publish(make_dir(tmp_path / "a", adapter_files()), uri, job="train", run_id="r")
    assert store.fetch(uri).path == Path(uri)
    (Path(uri) / "stray.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=re.escape("files not in the manifest: stray.bin")):
        store.fetch(uri)


def test_file_uri_and_plain_path_name_the_same_artifact(tmp_path: Path) -> None:
    path = tmp_path / "store" / "x"
    store.publish(make_dir(tmp_path / "a", adapter_files()), f"file://{path}", job="t", run_id="r")
    assert store.exists(str(path))


def test_secret_values_never_reach_a_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefSECRETvalue")
    uri = str(tmp_path / "store" / "x")
    settings = {"note": "token is hf_abcdefSECRETvalue"}
    store.publish(
        make_dir(tmp_path / "a", adapter_files()), uri, job="t", run_id="r", settings=settings
    )
    text = (Path(uri) / MANIFEST_NAME).read_text()
    assert "hf_abcdefSECRETvalue" not in text and "token is ***" in text


@pytest.mark.faults
def test_local_publish_killed_at_any_point_is_all_or_nothing(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "big", {f"part{i}.bin": os.urandom(8 * MIB) for i in range(6)})
    script = (
        "import sys; from loraforge.store import publish; "
        "publish(sys.argv[1], sys.argv[2], job='train', run_id='r')"
    )
    for delay in (0.05, 0.2, 0.5):
        uri = tmp_path / "store" / f"kill-{delay}"
        proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(uri)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if store.exists(str(uri)):  # it finished before the kill: then it must be whole
            store.fetch(str(uri))
        else:
            assert not uri.exists() and store.list_artifacts(str(tmp_path / "store")) == []


@pytest.mark.s3
def test_large_files_upload_in_parts(s3_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(12 * MIB)
    uri = f"{s3_bucket}/big"
    store.publish(
        make_dir(tmp_path / "a", {"w.safetensors": data}),
        uri,
        job="t",
        run_id="r",
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
    )
    bucket, key = object_bytes(uri, "w.safetensors")
    etag = (
        boto3.session.Session().client("s3").head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    )
    assert etag.endswith("-3")  # a multipart ETag: md5-of-parts + part count
    artifact = store.fetch(uri, tmp_path / "out")
    assert (artifact.path / "w.safetensors").read_bytes() == data


@pytest.mark.s3
@pytest.mark.faults
def test_upload_survives_a_paused_server(s3_env, s3_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = make_dir(tmp_path / "a", {f"p{i}.bin": os.urandom(4 * MIB) for i in range(4)})
    uri = f"{s3_bucket}/paused"
    pauser = threading.Timer(0.05, s3_env.pause)
    resumer = threading.Timer(3.05, s3_env.resume)
    pauser.start()
    resumer.start()
    try:
        started = time.monotonic()
        store.publish(src, uri, job="t", run_id="r", multipart_threshold=5 * MIB)
        elapsed = time.monotonic() - started
    finally:
        resumer.join()
    assert elapsed >= 2.5  # it really waited out the pause
    assert len(store.fetch(uri, tmp_path / "out").manifest.files) == 4


@pytest.mark.s3
@pytest.mark.faults
def test_server_killed_mid_publish_leaves_no_artifact(
    s3_env,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    src = make_dir(tmp_path / "a", adapter_files())
    uri = f"{s3_bucket}/killed"
    real_backend_for = store.backend_for

    def killing_backend(target, **options):  # type: ignore[no-untyped-def]
        backend = real_backend_for(target, **options)
        upload = backend.client.upload_file
        calls = []

        def upload_then_kill(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args)
            if len(calls) == 2:  # one file is up; the server dies before the second
                s3_env.kill()
            return upload(*args, **kwargs)

        backend.client.upload_file = upload_then_kill
        return backend

    monkeypatch.setattr(store, "backend_for", killing_backend)
    try:
        with pytest.raises(TransientError, match="unreachable after retries"):
            store.publish(src, uri, job="t", run_id="r", max_attempts=2)
    finally:
        s3_env.start()
    monkeypatch.setattr(store, "backend_for", real_backend_for)
    assert store.list_artifacts(s3_bucket) == []
    with pytest.raises(PermanentError, match="no published artifact"):
        store.fetch(uri, tmp_path / "out")
    parsed = parse_uri(uri)
    keys = boto3.session.Session().client("s3").list_objects_v2(Bucket=parsed.bucket)["Contents"]
    assert any("/.data/" in obj["Key"] for obj in keys)  # the first file did go up
    # the retry (a new pod) publishes whole, its own files only; the orphan stays invisible
    manifest = store.publish(src, uri, job="t", run_id="r")
    orphans = {k["Key"].split("/.data/")[1].split("/")[0] for k in keys if "/.data/" in k["Key"]}
    assert manifest.data_prefix.removeprefix(".data/") not in orphans
    assert store.fetch(uri, tmp_path / "out").manifest == manifest
    assert store.list_artifacts(s3_bucket) == [uri]


@pytest.mark.s3
@pytest.mark.faults
def test_wrong_credentials_fail_permanently(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermanentError, match="refused the credentials") as err:
        store.publish(
            make_dir(tmp_path / "a", adapter_files()), f"{s3_bucket}/x", job="t", run_id="r"
        )
    assert "not-the-secret" not in str(err.value)


@pytest.mark.s3
@pytest.mark.faults
def test_missing_bucket_fails_permanently(s3_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentError, match="bucket 'no-such-bucket-x' does not exist"):
        store.publish(
            make_dir(tmp_path / "a", adapter_files()),
            "s3://no-such-bucket-x/p",
            job="t",
            run_id="r",
        )


@pytest.mark.faults
def test_unreachable_endpoint_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(TransientError, match="unreachable after retries"):
        store.read_manifest("s3://some-bucket/p", max_attempts=2)
