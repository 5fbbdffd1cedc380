"""Store faults the jobs meet in production, against SeaweedFS and a size-limited local disk.

Beyond tests/test_store.py (SIGSTOP during upload, server killed mid-publish, wrong credentials,
missing bucket, threads racing to publish): the server paused during a download, and paused
past the retries in either direction; the server killed while a training job uploads a
checkpoint, restarted, and the rerun resuming; credentials that may read but not write; a full
local disk (a tmpfs of a few hundred KiB in a private mount namespace, where `unshare` allows
one; otherwise ENOSPC is simulated and the test id says so); jobs racing to publish the same
output with a reader polling it. Each ends in a clean retry or exit 75/2 with one clear line,
never a published artifact with missing or wrong files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loraforge import store
from loraforge.errors import (
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    IntegrityError,
    PermanentError,
    TransientError,
)
from tests.conftest import READER_KEY, READER_SECRET, SeaweedS3
from tests.faults import Jobs, assert_bit_identical, record, tensors, train_env
from tests.test_faults import edit_env

pytestmark = pytest.mark.faults
MIB = 2**20
ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def one_line(text: str) -> str:
    """The single non-empty line of a CLI's stderr (no traceback, nothing else)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


# --- paused server -------------------------------------------------------------------------------


@pytest.mark.s3
def test_download_survives_a_paused_server(
    s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    files = {f"p{i}.bin": os.urandom(4 * MIB) for i in range(3)}
    uri = f"{s3_bucket}/paused-download"
    store.publish(make_dir(tmp_path / "src", files), uri, job="t", run_id="r")
    pauser, resumer = threading.Timer(0.05, s3_env.pause), threading.Timer(3.05, s3_env.resume)
    pauser.start()
    resumer.start()
    try:
        started = time.monotonic()
        artifact = store.fetch(uri, tmp_path / "out", multipart_threshold=5 * MIB)
        elapsed = time.monotonic() - started
    finally:
        resumer.join()
    assert elapsed >= 2.5  # it really waited the pause out
    assert {p.name: p.read_bytes() for p in artifact.path.glob("*.bin")} == files
    record("store_faults", {"case": "server paused 3 s during download", "outcome": "fetched"})


def _pause_when_written(server: SeaweedS3, root: Path, stop: threading.Event) -> None:
    """Pause the server as soon as a download has written its first bytes under `root`."""
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        if any(p.is_file() and p.stat().st_size > 0 for p in root.glob(".out.fetch-*/**/*")):
            server.pause()
            return
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.s3
def test_download_paused_past_the_retries_is_transient_and_leaves_nothing(
    s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    files = {f"p{i}.bin": os.urandom(48 * MIB) for i in range(2)}
    uri = f"{s3_bucket}/paused-long"
    store.publish(make_dir(tmp_path / "src", files), uri, job="t", run_id="r")
    stop = threading.Event()
    watcher = threading.Thread(target=_pause_when_written, args=(s3_env, tmp_path, stop))
    watcher.start()
    try:  # the body stops mid-object: s3transfer retries the stream, then gives up
        with pytest.raises(TransientError, match=r"kept failing after retries|unreachable") as err:
            store.fetch(
                uri, tmp_path / "out", read_timeout=1, max_attempts=2, multipart_chunksize=8 * MIB
            )
    finally:
        stop.set()
        watcher.join()
        s3_env.resume()
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial copy, no staging
    assert len(store.fetch(uri, tmp_path / "out").manifest.files) == 2  # a retry succeeds
    record(
        "store_faults",
        {"case": "server paused mid-download past the retries", "outcome": str(err.value)},
    )


@pytest.mark.slow
@pytest.mark.s3
def test_upload_paused_past_the_retries_is_transient_then_a_retry_publishes(
    s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_dir(tmp_path / "src", {f"p{i}.bin": os.urandom(6 * MIB) for i in range(3)})
    uri = f"{s3_bucket}/paused-upload"
    real_backend_for = store.backend_for

    def pausing_backend(target, **options):  # type: ignore[no-untyped-def]
        backend = real_backend_for(target, **options)
        upload, calls = backend.client.upload_file, []

        def upload_then_pause(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args)
            if len(calls) == 2:  # one file is up; the server stops answering before the next
                s3_env.pause()
            return upload(*args, **kwargs)

        backend.client.upload_file = upload_then_pause
        return backend

    monkeypatch.setattr(store, "backend_for", pausing_backend)
    try:
        with pytest.raises(TransientError) as err:
            store.publish(
                src, uri, job="t", run_id="r", read_timeout=1, max_attempts=2,
                multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB,
            )  # fmt: skip
    finally:
        s3_env.resume()
    monkeypatch.setattr(store, "backend_for", real_backend_for)
    assert "\n" not in str(err.value)
    assert not store.exists(uri) and store.list_artifacts(s3_bucket) == []
    store.publish(src, uri, job="t", run_id="r")  # the rerun publishes
    assert len(store.fetch(uri, tmp_path / "out").manifest.files) == 3
    record(
        "store_faults",
        {"case": "server paused mid-upload past the retries", "outcome": str(err.value)},
    )


# --- server killed during a job, restarted, rerun ------------------------------------------------


@pytest.mark.slow
@pytest.mark.s3
def test_store_killed_during_a_checkpoint_upload_exits_75_and_the_rerun_resumes(
    jobs: Jobs, tiny_kit: Any, reference: Any, s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    env = train_env(tiny_kit, f"{s3_bucket}/store", "lora", "s3-killed")
    env["AWS_MAX_ATTEMPTS"] = "2"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    running = jobs.start("train", env, "wait@ckpt-upload:4:2", barrier=barrier)
    deadline = time.monotonic() + 120
    while not any(barrier.iterdir()):  # the job holds, half of checkpoint 4 uploaded
        assert running.process.is_alive() and time.monotonic() < deadline, running.err_text()
        time.sleep(0.02)
    s3_env.kill()
    try:
        (barrier / "test").touch()
        killed = running.wait()
    finally:
        s3_env.start()
    assert killed.code == EXIT_TRANSIENT, killed.err[-3000:]
    assert len(killed.errors) == 1 and "unreachable after retries" in killed.errors[0]["msg"]
    for _ in range(3):  # as the Job's backoffLimit would: exit 75 is retried
        rerun = jobs.run("train", env)
        if rerun.code != EXIT_TRANSIENT:
            break
        time.sleep(2)
    assert rerun.code == 0, rerun.err[-3000:]
    assert rerun.resumed_at == 2  # checkpoint 4 never got its manifest: it does not exist
    assert_bit_identical(tensors(f"{s3_bucket}/store/s3-killed/train"), tensors(reference("lora")))
    record(
        "store_faults",
        {
            "case": "server killed mid checkpoint upload, restarted",
            "outcome": killed.errors[0]["msg"],
        },
    )


# --- credentials that may read but not write -----------------------------------------------------


@pytest.mark.s3
def test_read_only_credentials_exit_2_with_one_line(
    jobs: Jobs, tiny_kit: Any, s3_bucket: str, tmp_path: Path
) -> None:
    reader = {"AWS_ACCESS_KEY_ID": READER_KEY, "AWS_SECRET_ACCESS_KEY": READER_SECRET}
    src = make_dir(tmp_path / "src", {"a.bin": b"x" * 1000})
    done = jobs.cli(["publish", str(src), f"{s3_bucket}/ro"], env=reader)
    assert done.code == EXIT_PERMANENT
    line = one_line(done.err)
    assert "refused the credentials (AccessDenied)" in line and READER_SECRET not in line
    env = {**train_env(tiny_kit, f"{s3_bucket}/store", "lora", "ro"), **reader}
    run = jobs.run("train", env)
    assert run.code == EXIT_PERMANENT, run.err[-3000:]
    assert len(run.errors) == 1 and "refused the credentials" in run.errors[0]["msg"]
    assert "Traceback" not in run.err and store.list_artifacts(s3_bucket) == []
    record("store_faults", {"case": "credentials that may read, not write", "outcome": line})


# --- a full local disk ---------------------------------------------------------------------------

_MOUNT = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'


def _namespace_mount() -> list[str] | None:
    """`unshare -rm` can give this user a private tmpfs (None when the kernel refuses)."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _MOUNT, "sh", "64k", "/tmp", "true"],
        capture_output=True,
        timeout=30,
    )
    return ["unshare", "-rm", "sh", "-c", _MOUNT, "sh"] if probe.returncode == 0 else None


NAMESPACE_MOUNT = _namespace_mount()
on_tmpfs = pytest.mark.skipif(
    NAMESPACE_MOUNT is None,
    reason="unshare cannot mount a private tmpfs here (see the simulated case)",
)
# Inside the namespace: run the command, then report what is left on the small disk.
_REPORT = textwrap.dedent("""
    import json, os, subprocess, sys
    done = subprocess.run(sys.argv[2:], capture_output=True, text=True)
    from loraforge import store
    left = sorted(os.path.relpath(os.path.join(d, f), sys.argv[1])
                  for d, _, fs in os.walk(sys.argv[1]) for f in fs)
    print(json.dumps({"code": done.returncode, "err": done.stderr, "out": done.stdout,
                      "left": left, "published": store.list_artifacts(sys.argv[1])}))
""")


def on_small_disk(size: str, disk: Path, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command` with a `size` tmpfs mounted at `disk`; what it returned and left there."""
    assert NAMESPACE_MOUNT is not None
    disk.mkdir(parents=True, exist_ok=True)
    report = [sys.executable, "-c", _REPORT, str(disk), *command]
    done = subprocess.run(
        [*NAMESPACE_MOUNT, size, str(disk), *report],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.splitlines()[-1]))


@on_tmpfs
def test_publish_to_a_full_local_disk_exits_75_and_leaves_nothing(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src", {"a.bin": os.urandom(MIB), "b.bin": os.urandom(MIB)})
    disk = tmp_path / "disk"
    result = on_small_disk(
        "1m", disk, [str(BIN / "loraforge"), "publish", str(src), str(disk / "store" / "x")], {}
    )
    assert result["code"] == EXIT_TRANSIENT, result
    line = one_line(result["err"])
    assert "no space left on the device" in line and "LORAFORGE_STORE" in line
    assert result["published"] == [] and result["left"] == []  # no staging directory either
    record("store_faults", {"case": "local store on a full disk (1 MiB tmpfs)", "outcome": line})


@on_tmpfs
@pytest.mark.s3
def test_fetch_into_a_full_cache_exits_75_and_leaves_nothing(
    s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/big"
    store.publish(
        make_dir(tmp_path / "src", {"w.bin": os.urandom(2 * MIB)}), uri, job="t", run_id="r"
    )
    disk = tmp_path / "disk"
    result = on_small_disk(
        "1m", disk, [str(BIN / "loraforge"), "fetch", uri, str(disk / "copy")], {}
    )
    assert result["code"] == EXIT_TRANSIENT, result
    assert "no space left on the device" in one_line(result["err"])
    assert result["left"] == []
    record(
        "store_faults",
        {"case": "fetch into a full cache (1 MiB tmpfs)", "outcome": one_line(result["err"])},
    )


@pytest.mark.slow
@on_tmpfs
def test_training_on_a_full_disk_exits_75_with_one_line(tiny_kit: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    env = train_env(tiny_kit, str(disk / "store"), "lora", "full")
    env["LORAFORGE_LOG_FORMAT"] = "json"
    result = on_small_disk("192k", disk, [str(BIN / "loraforge-train")], env)
    assert result["code"] == EXIT_TRANSIENT, result["err"][-3000:]
    errors = [json.loads(x) for x in result["err"].splitlines() if '"level": "error"' in x]
    assert len(errors) == 1 and "no space left on the device" in errors[0]["msg"]
    assert "Traceback" not in result["err"] and result["published"] == [] and result["left"] == []
    record(
        "store_faults",
        {"case": "train with its store on a full disk (192 KiB)", "outcome": errors[0]["msg"]},
    )


def test_full_disk_simulated_is_transient_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no tmpfs can be mounted: the first write past a budget raises ENOSPC."""
    src = make_dir(tmp_path / "src", {"a.bin": os.urandom(MIB), "b.bin": os.urandom(MIB)})
    real = store._copy_synced
    budget = [1]

    def copy_until_full(source: Path, dest: Path) -> None:
        if budget[0] == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        budget[0] -= 1
        real(source, dest)

    monkeypatch.setattr(store, "_copy_synced", copy_until_full)
    with pytest.raises(TransientError, match="no space left on the device"):
        store.publish(src, str(tmp_path / "store" / "x"), job="t", run_id="r")
    assert store.list_artifacts(str(tmp_path / "store")) == []
    assert list((tmp_path / "store").iterdir()) == []  # the staging directory is gone too


# --- jobs racing to publish one output -----------------------------------------------------------


def _reader(uri: str, root: Path, stop: threading.Event, seen: list[str]) -> None:
    """Fetch `uri` over and over: it is absent or whole and verified, never anything else."""
    count = 0
    while not stop.is_set():
        count += 1
        try:
            artifact = store.fetch(uri, root / f"r{count}")
            meta = json.loads((artifact.path / "spectral_edit_meta.json").read_text())
            seen.append(meta["params"]["mode"])
        except IntegrityError as exc:
            seen.append(f"MIX: {exc}")
        except PermanentError as exc:
            assert "no published artifact" in str(exc), exc
        time.sleep(0.005)


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_concurrent_jobs_to_one_output_one_wins_and_readers_never_see_a_mix(
    jobs: Jobs, tiny_kit: Any, reference: Any, tmp_path: Path, backend: str, request: Any
) -> None:
    root = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("s3_bucket")
    output = f"{root}/race/edit"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    modes = ["abs_select", "smooth_abs"]
    envs = [
        {**edit_env(tiny_kit, reference("lora"), root), "LORAFORGE_EDIT_MODE": mode,
         "LORAFORGE_OUTPUT": output, "LORAFORGE_RUN_ID": mode.replace("_", "-")}
        for mode in modes
    ]  # fmt: skip
    stop, seen = threading.Event(), list[str]()
    reader = threading.Thread(target=_reader, args=(output, tmp_path / "reads", stop, seen))
    reader.start()
    try:  # both hold with every file stored until the other is there too, then race
        running = [jobs.start("edit", env, "wait@final-manifest", barrier=barrier) for env in envs]
        finished = [r.wait() for r in running]
        time.sleep(0.1)
    finally:
        stop.set()
        reader.join()
    codes = sorted(f.code for f in finished)
    assert codes == [0, EXIT_PERMANENT], [f.err[-2000:] for f in finished]
    winner = modes[[f.code for f in finished].index(0)]
    loser = finished[[f.code for f in finished].index(EXIT_PERMANENT)]
    assert len(loser.errors) == 1 and "Traceback" not in loser.err
    message = loser.errors[0]["msg"]
    assert "already published" in message or "published by another writer first" in message
    assert not [s for s in seen if s.startswith("MIX")] and set(seen) <= {winner}
    meta = json.loads((store.fetch(output).path / "spectral_edit_meta.json").read_text())
    assert meta["params"]["mode"] == winner
    record(
        "store_faults",
        {
            "case": f"two edit jobs publish one output ({backend})",
            "outcome": message,
            "reads": len(seen),
        },
    )


def test_replicas_of_one_training_run_share_checkpoints_and_one_publishes(
    jobs: Jobs, tiny_kit: Any, reference: Any, tmp_path: Path
) -> None:
    """A replacement pod may start while the old one still runs (podReplacementPolicy): both
    publish the same checkpoints; losing that race is no error, and one publishes the output."""
    env = train_env(tiny_kit, str(tmp_path / "store"), "lora", "replicas")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    running = [jobs.start("train", env, "wait@ckpt-manifest:2", barrier=barrier) for _ in range(2)]
    finished = [r.wait() for r in running]
    codes = sorted(f.code for f in finished)
    assert codes == [0, EXIT_PERMANENT], [f.err[-2000:] for f in finished]
    loser = finished[[f.code for f in finished].index(EXIT_PERMANENT)]
    assert (
        "already published" in loser.errors[0]["msg"] or "another writer" in loser.errors[0]["msg"]
    )
    warned = [e for f in finished for e in f.errors + f.log if "another writer" in e.get("msg", "")]
    assert warned  # one of them lost the checkpoint race and went on
    assert_bit_identical(
        tensors(str(tmp_path / "store/replicas/train")), tensors(reference("lora"))
    )
