"""Secrets: canary values never appear in anything the jobs and the launcher produce.

Canaries are set where a pod has secrets: the S3 secret key (the real one the test server
accepts), AWS_SESSION_TOKEN (local store only: SeaweedFS refuses session tokens), HF_TOKEN,
and credentials pasted where they do not belong (a URI's `user:password@`, a job spec). The
whole flow runs (train with checkpoints, edit, eval, the launcher's check/render/ls/fetch/
publish), and so do the failures that print the most (wrong secret, credentials in a URI);
then every byte produced is scanned: stdout, stderr (JSON logs), every object in the bucket
and file in the stores and caches (manifests, metrics.json, reports, predictions, checkpoints),
rendered YAML and the termination log. No job has a SecretStr setting today; the settings
class redacts them (tests/test_settings.py), and the scan would find one that leaked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest

from loraforge import runner
from loraforge.errors import EXIT_PERMANENT
from loraforge.settings import TrainSettings
from loraforge.uri import parse_uri
from tests.conftest import SECRET_KEY
from tests.faults import Finished, Jobs, record, train_env
from tests.test_faults import edit_env, eval_env

pytestmark = pytest.mark.faults

SESSION_CANARY = "canary-session-token-7f3a9c0e55"
HF_CANARY = "hf_canaryCANARYcanaryCANARYcanary12"
WRONG_CANARY = "canary-wrong-secret-4b1d2e"
URI_CANARY = "canary-uri-password-91e2"
CANARIES = (SECRET_KEY, SESSION_CANARY, HF_CANARY, WRONG_CANARY, URI_CANARY)


def leaks(data: bytes | str, where: str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [f"{where}: {c[:12]}…" for c in CANARIES if c.encode() in raw]


def scan_tree(root: Path) -> list[str]:
    found: list[str] = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found += leaks(path.read_bytes(), str(path))
    return found


def scan_bucket(bucket_uri: str) -> tuple[list[str], int]:
    client = boto3.session.Session().client("s3")
    bucket = parse_uri(bucket_uri).bucket
    found, count = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            count += 1
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found += leaks(body, f"s3://{bucket}/{obj['Key']}")
    return found, count


def scan_runs(runs: list[Finished]) -> list[str]:
    found: list[str] = []
    for index, run in enumerate(runs):
        found += leaks(run.out, f"run {index} stdout") + leaks(run.err, f"run {index} stderr")
    return found


def spec_file(path: Path, env: dict[str, str]) -> str:
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k.startswith("LORAFORGE_")))
    return str(path)


@pytest.mark.s3
def test_no_secret_in_anything_a_flow_on_s3_produces(
    jobs: Jobs, tiny_kit: Any, s3_bucket: str, tmp_path: Path
) -> None:
    canaries = {"HF_TOKEN": HF_CANARY, "LORAFORGE_CACHE": str(tmp_path / "cache")}
    store_uri = f"{s3_bucket}/store"
    train = {**train_env(tiny_kit, store_uri, "lora", "sec"), "LORAFORGE_MAX_STEPS": "4"}
    adapter = f"{store_uri}/sec/train"
    edit = {**edit_env(tiny_kit, adapter, store_uri), "LORAFORGE_RUN_ID": "sec"}
    evaluate = {**eval_env(tiny_kit, adapter, store_uri), "LORAFORGE_RUN_ID": "sec"}
    runs = [jobs.run(job, {**env, **canaries}) for job, env in
            (("train", train), ("edit", edit), ("eval", evaluate))]  # fmt: skip
    assert [r.code for r in runs] == [0, 0, 0], [r.err[-2000:] for r in runs]
    specs = {job: spec_file(tmp_path / f"{job}.env", env) for job, env in
             (("train", train), ("edit", edit), ("eval", evaluate))}  # fmt: skip
    for job, spec in specs.items():
        runs.append(jobs.cli(["check", job, "--env-file", spec], env=canaries))
        render = ["render", job, "--env-file", spec, "--gpu", "none", "--s3-secret", "loraforge-s3"]
        runs.append(jobs.cli(render, env=canaries))
    runs.append(jobs.cli(["ls", s3_bucket], env=canaries))
    runs.append(jobs.cli(["fetch", adapter, str(tmp_path / "copy")], env=canaries))
    assert all(r.code == 0 for r in runs), [r.err[-1000:] for r in runs if r.code]
    assert "kind: Job" in runs[4].out and "secretRef" in runs[4].out  # the YAML was scanned
    found = scan_runs(runs) + scan_tree(tmp_path)
    bucket_found, objects = scan_bucket(s3_bucket)
    assert not found + bucket_found, found + bucket_found
    record("secrets", {"scan": "flow on S3", "runs": len(runs), "objects": objects,
                       "files": sum(1 for p in tmp_path.rglob("*") if p.is_file())})  # fmt: skip


def test_no_secret_in_anything_a_local_flow_produces(
    jobs: Jobs, tiny_kit: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canaries = {
        "AWS_ACCESS_KEY_ID": "AKIACANARY0000000000",
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_CANARY,
        "HF_TOKEN": HF_CANARY,
        "LORAFORGE_CACHE": str(tmp_path / "cache"),
    }
    root = str(tmp_path / "store")
    train = {**train_env(tiny_kit, root, "dora", "sec"), "LORAFORGE_MAX_STEPS": "4"}
    evaluate = {**eval_env(tiny_kit, f"{root}/sec/train", root), "LORAFORGE_RUN_ID": "sec"}
    runs = [jobs.run("train", {**train, **canaries}), jobs.run("eval", {**evaluate, **canaries})]
    assert [r.code for r in runs] == [0, 0], [r.err[-2000:] for r in runs]
    runs.append(jobs.cli(["ls", root], env=canaries))
    found = scan_runs(runs) + scan_tree(tmp_path)
    assert not found, found
    record("secrets", {"scan": "flow on a local store", "runs": len(runs),
                       "files": sum(1 for p in tmp_path.rglob("*") if p.is_file())})  # fmt: skip


@pytest.mark.s3
def test_no_secret_in_the_failures_that_say_the_most(
    jobs: Jobs,
    tiny_kit: Any,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = train_env(tiny_kit, f"{s3_bucket}/store", "lora", "fail")
    wrong = jobs.run("train", {**env, "AWS_SECRET_ACCESS_KEY": WRONG_CANARY})
    in_uri = f"s3://AKIAIOSFODNN7EXAMPLE:{URI_CANARY}@bucket/x"
    pasted = jobs.run("train", {**env, "LORAFORGE_STORE": in_uri})
    spec = spec_file(tmp_path / "train.env", {**env, "LORAFORGE_STORE": in_uri})
    checked = jobs.cli(["check", "train", "--env-file", spec])
    rendered = jobs.cli(["render", "train", "--env-file", spec, "--gpu", "l4"])
    runs = [wrong, pasted, checked, rendered]
    assert [r.code for r in runs] == [EXIT_PERMANENT] * 4, [r.err[-1000:] for r in runs]
    assert "refused the credentials" in wrong.errors[0]["msg"]
    assert "s3://***@bucket/x" in pasted.errors[0]["msg"]  # named, with the password redacted
    # the termination log (what `kubectl describe` shows) is written outside the logger
    termination = tmp_path / "termination-log"
    termination.write_text("")
    monkeypatch.setattr(runner, "TERMINATION_LOG", str(termination))
    for name, value in {**env, "LORAFORGE_STORE": in_uri}.items():
        monkeypatch.setenv(name, value)
    assert runner.run_job(TrainSettings, lambda s, c: None) == EXIT_PERMANENT
    captured = capsys.readouterr()
    found = scan_runs(runs) + leaks(termination.read_text(), "termination log")
    found += leaks(captured.err + captured.out, "in-process job")
    assert "LORAFORGE_STORE" in termination.read_text()
    assert not found, found
    record(
        "secrets", {"scan": "failures: wrong secret, credentials in a URI", "runs": len(runs) + 1}
    )
