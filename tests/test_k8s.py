"""Every shipped Kubernetes file validates strictly against the supported minor versions and
passes the policy linters (checkov for k8s/ and the Dockerfile, hadolint)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

ROOT = Path(__file__).parents[1]
OLDEST = Version("1.31")  # podFailurePolicy and podReplacementPolicy are GA from 1.31 on
# 1.31 through the newest minor version whose schemas kubernetes-validate bundles.
VERSIONS = sorted({v for v in all_versions() if Version(v) >= OLDEST}, key=Version)
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
MANIFESTS = sorted(p for p in (ROOT / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, object]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Kubeflow custom resources (k8s/examples): validated against the vendored CRD schemas in
# tests/test_scale_render.py; kubernetes-validate knows core kinds only.
CRD_GROUPS = ("trainer.kubeflow.org/", "kubeflow.org/")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in documents(path):
        if not str(doc["apiVersion"]).startswith(CRD_GROUPS):
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    doc = documents(ROOT / "k8s/base/serviceaccount.yaml")[0]
    bad = {**doc, "automountServiceAcountToken": False}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_base_file() -> None:
    base = ROOT / "k8s/base"
    listed = set(yaml.safe_load((base / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml"}


def test_job_pods_get_no_service_account_token() -> None:
    accounts = documents(ROOT / "k8s/base/serviceaccount.yaml")
    assert all(doc["automountServiceAccountToken"] is False for doc in accounts)


def test_dockerfile_passes_hadolint() -> None:
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_tini_as_pid_1_and_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].startswith(("0", "root"))


def test_supported_versions_start_at_1_31() -> None:
    assert VERSIONS[0] == "1.31.0", "kubernetes-validate no longer bundles 1.31: raise OLDEST"
    assert len(VERSIONS) >= 2


def run_checkov(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHECKOV.exists(), "checkov is not installed: run `make tools` (it lives in .venv-tools)"
    return subprocess.run(
        [str(CHECKOV), *args, "--config-file", str(ROOT / ".checkov.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_k8s_passes_checkov() -> None:
    done = run_checkov("--framework", "kubernetes", "-d", "k8s")
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_passes_checkov() -> None:
    done = run_checkov("--framework", "dockerfile", "-f", "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_checkov_skip_says_why() -> None:
    text = (ROOT / ".checkov.yaml").read_text()
    skips = yaml.safe_load(text).get("skip-check") or []
    for check in skips:
        line = next(line for line in text.splitlines() if check in line)
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 20, f"{check}: give a reason"
