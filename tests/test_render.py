"""`loraforge render`: the Job for each spec carries design.md's Kubernetes semantics, validates
strictly, matches the committed examples, never holds a credential, and bad input exits 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraforge import __version__
from loraforge.errors import PermanentError
from loraforge.launcher import client
from loraforge.launcher.cli import build_parser
from loraforge.launcher.render import CREDENTIAL_VALUE, render_from_args, to_yaml
from loraforge.logs import SECRET_NAME
from loraforge.settings import JOB_SETTINGS
from tests.test_k8s import VERSIONS

ROOT = Path(__file__).parents[1]
JOBS = ["train", "edit", "eval"]
LOCAL = {"LORAFORGE_BASE_MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "LORAFORGE_RUN_ID": "r1"}
LOCAL_SPECS = {
    "train": {**LOCAL, "LORAFORGE_DATA": "data/train.jsonl", "LORAFORGE_STORE": "/tmp/store"},
    "edit": {**LOCAL, "LORAFORGE_ADAPTER": "/tmp/store/r1/train", "LORAFORGE_STORE": "/tmp/s"},
    "eval": {**LOCAL, "LORAFORGE_STORE": "/tmp/store"},
}


def render(job: str, *flags: str, env_file: str | Path | None = None) -> dict[str, Any]:
    """Render in-process through the CLI's own parser."""
    spec = str(env_file or f"jobs/{job}.env")
    args = build_parser().parse_args(["render", job, "--env-file", spec, *flags])
    return render_from_args(job, args)


def shipped(job: str, *flags: str) -> dict[str, Any]:
    return render(job, "--gpu", "a100-80gb", "--s3-secret", "loraforge-s3", *flags)


def write_spec(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def ctr(job: dict[str, Any]) -> dict[str, Any]:
    [container] = pod(job)["containers"]
    return container  # type: ignore[no-any-return]


def env_of(job: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in ctr(job)["env"]}


# --- the committed examples ---------------------------------------------------------------


EXAMPLES = sorted((ROOT / "k8s" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_committed_example_equals_a_fresh_render(path: Path) -> None:
    text = path.read_text()
    header = [line for line in text.splitlines(keepends=True) if line.startswith("#")]
    command = header[0].split(": ", 1)[1].split()
    assert command[:2] == ["loraforge", "render"] and command[3] == "--env-file"
    assert path.stem.split("-")[0] == command[2]  # train-multinode.yaml renders train
    fresh = render_from_args(command[2], build_parser().parse_args(command[1:]))
    assert text == "".join(header) + to_yaml(fresh), f"{path} is stale: run `make render-examples`"


def test_every_example_is_rendered_by_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    scale = set(re.findall(r'^  "([a-z-]+) ', makefile, re.M))
    assert {p.stem for p in EXAMPLES} == set(JOBS) | scale


def test_examples_are_rendered_with_the_makefile_flags() -> None:
    flags = re.search(r"^EXAMPLE_FLAGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert flags is not None
    for job in JOBS:
        first = (ROOT / "k8s" / "examples" / f"{job}.yaml").read_text().splitlines()[0]
        assert first.endswith(f"loraforge render {job} --env-file jobs/{job}.env {flags[1]}")


# --- what every Job carries ---------------------------------------------------------------


@pytest.mark.parametrize("job", JOBS)
def test_pod_failure_policy_follows_the_exit_code_table(job: str) -> None:
    spec = shipped(job)["spec"]
    assert spec["podFailurePolicy"] == {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": job, "operator": "In", "values": [2]},
            },
            {
                "action": "Count",
                "onExitCodes": {"containerName": job, "operator": "In", "values": [75, 143]},
            },
        ]
    }
    assert ctr(shipped(job))["name"] == job  # the rules' containerName
    assert spec["podReplacementPolicy"] == "Failed"
    assert pod(shipped(job))["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    ("job", "deadline", "grace"), [("train", 86400, 120), ("edit", 14400, 30), ("eval", 43200, 30)]
)
def test_limits_in_time_and_retries(job: str, deadline: int, grace: int) -> None:
    rendered = shipped(job)
    assert rendered["spec"]["backoffLimit"] == 3
    assert rendered["spec"]["activeDeadlineSeconds"] == deadline
    assert rendered["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    assert pod(rendered)["terminationGracePeriodSeconds"] == grace
    custom = shipped(job, "--deadline", "600", "--backoff-limit", "0", "--ttl", "60")["spec"]
    assert (custom["activeDeadlineSeconds"], custom["backoffLimit"]) == (600, 0)
    assert custom["ttlSecondsAfterFinished"] == 60


@pytest.mark.parametrize("job", JOBS)
def test_name_labels_and_annotations(job: str) -> None:
    rendered = shipped(job)
    meta = rendered["metadata"]
    assert meta["name"] == f"qwen05-gsm8k-lora-{job}"
    assert meta["namespace"] == "loraforge"
    labels = {
        "app.kubernetes.io/name": "loraforge",
        "app.kubernetes.io/component": job,
        "app.kubernetes.io/instance": "qwen05-gsm8k-lora",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/part-of": "loraforge",
        "app.kubernetes.io/managed-by": "loraforge",
    }
    assert meta["labels"] == labels
    assert rendered["spec"]["template"]["metadata"]["labels"] == labels
    notes = meta["annotations"]
    assert notes["loraforge.dev/gpu"] == "A100-80GB"
    assert 0 < float(notes["loraforge.dev/estimated-peak-gib"]) < 80 * 0.9
    assert notes["loraforge.dev/output"] == f"s3://loraforge-artifacts/runs/qwen05-gsm8k-lora/{job}"
    assert "&id" not in to_yaml(rendered)  # no YAML anchors


def test_a_48_character_run_id_gives_a_dns_label_name(tmp_path: Path) -> None:
    run_id = "a" * 47 + "z"
    spec = write_spec(tmp_path / "t.env", {**LOCAL_SPECS["train"], "LORAFORGE_RUN_ID": run_id})
    name = render("train", "--gpu", "L4", env_file=spec)["metadata"]["name"]
    assert name == f"{run_id}-train" and len(name) <= 63
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)


@pytest.mark.parametrize("job", JOBS)
def test_restricted_pod_security(job: str) -> None:
    rendered = shipped(job)
    assert pod(rendered)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert ctr(rendered)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod(rendered)["automountServiceAccountToken"] is False
    assert pod(rendered)["serviceAccountName"] == "loraforge-job"
    assert ctr(rendered)["terminationMessagePolicy"] == "FallbackToLogsOnError"


@pytest.mark.parametrize("job", JOBS)
def test_writable_paths_are_empty_dirs_and_shm_is_memory(job: str) -> None:
    rendered = shipped(job)
    mounts = {m["mountPath"]: m["name"] for m in ctr(rendered)["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", "/cache": "cache", "/work": "work", "/dev/shm": "dshm"}
    volumes = {v["name"]: v for v in pod(rendered)["volumes"]}
    assert set(volumes) == set(mounts.values())
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values())
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    env = env_of(rendered)
    assert env["HF_HOME"] == "/cache/hf" and env["HOME"] == "/tmp"
    assert env["LORAFORGE_CACHE"] == "/cache/loraforge"


@pytest.mark.parametrize("job", JOBS)
def test_container_runs_the_console_script_under_tini(job: str) -> None:
    container = ctr(shipped(job))
    assert container["command"] == ["/usr/bin/tini", "--", f"loraforge-{job}"]
    assert container["image"] == f"ghcr.io/loraforge/loraforge:{__version__}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    other = ctr(shipped(job, "--image", "registry.example/lf@sha256:" + "0" * 64))
    assert other["image"] == "registry.example/lf@sha256:" + "0" * 64


@pytest.mark.parametrize("job", JOBS)
def test_resources_request_cpu_memory_and_one_gpu(job: str) -> None:
    resources = ctr(shipped(job))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in resources["requests"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    shm = next(v for v in pod(shipped(job))["volumes"] if v["name"] == "dshm")
    gib = int(resources["limits"]["memory"].removesuffix("Gi"))
    assert gib > int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi"))  # shm is charged to it


def test_memory_grows_with_the_model(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(llama_config(hidden=8192, layers=80)))
    small = write_spec(tmp_path / "small.env", LOCAL_SPECS["train"])
    large = write_spec(
        tmp_path / "large.env", {**LOCAL_SPECS["train"], "LORAFORGE_BASE_MODEL": str(big)}
    )
    gib = [
        int(ctr(render("train", "--gpu", gpu, env_file=spec))["resources"]["limits"]["memory"][:-2])
        for spec in (small, large)
        for gpu in ("none", "H200")
    ]
    assert gib[2] > 10 * gib[0]  # on the CPU the model lives in host memory
    assert gib[3] > gib[1]  # on a GPU, loading peaks grow with it


# --- the GPU: limit, toleration, node selection ------------------------------------------


def test_catalog_gpu_with_several_products_is_selected_by_node_affinity() -> None:
    spec = pod(shipped("train"))
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {
                    "key": "nvidia.com/gpu.product",
                    "operator": "In",
                    "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
                }
            ]
        }
    ]
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "nodeSelector" not in spec


@pytest.mark.parametrize("gpu", ["L4", "NVIDIA-L4"])
def test_one_product_is_a_node_selector_and_node_pins_the_hostname(gpu: str) -> None:
    spec = pod(render("train", "--gpu", gpu, "--s3-secret", "s", "--node", "gpu-7"))
    assert spec["nodeSelector"] == {
        "kubernetes.io/hostname": "gpu-7",
        "nvidia.com/gpu.product": "NVIDIA-L4",
    }
    assert "affinity" not in spec


def test_a_gfd_product_name_selects_exactly_that_product() -> None:
    spec = pod(render("eval", "--gpu", "NVIDIA-A100-80GB-PCIe", "--s3-secret", "s"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-80GB-PCIe"}


def test_mig_slice_is_selected_by_gpu_memory_not_product() -> None:
    spec = pod(render("eval", "--gpu", "mig-3g.40gb", "--s3-secret", "s"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.memory": "40192"}
    assert "affinity" not in spec


@pytest.mark.parametrize("job", JOBS)
def test_gpu_none_renders_a_cpu_job(job: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "t.env", LOCAL_SPECS[job])
    rendered = render(job, "--gpu", "none", env_file=spec)
    assert not {"nodeSelector", "affinity", "tolerations"} & set(pod(rendered))
    assert "nvidia.com/gpu" not in ctr(rendered)["resources"]["limits"]
    assert env_of(rendered)["LORAFORGE_DEVICE"] == "cpu"
    assert rendered["metadata"]["annotations"]["loraforge.dev/gpu"] == "none"
    assert "loraforge.dev/estimated-peak-gib" not in rendered["metadata"]["annotations"]


# --- env: the spec, the plan over it, credentials only by reference -----------------------


@pytest.mark.parametrize("job", JOBS)
def test_env_is_the_spec_with_the_plan_over_it(job: str) -> None:
    from loraforge.settings import read_env_file

    env = env_of(shipped(job))
    spec = read_env_file(ROOT / "jobs" / f"{job}.env")
    overridden = {"LORAFORGE_LOG_FORMAT", "LORAFORGE_DEVICE"}
    sized = {
        "train": "LORAFORGE_MICRO_BATCH_SIZE",
        "edit": "LORAFORGE_CALIB_BATCH_SIZE",
        "eval": "LORAFORGE_BATCH_SIZE",
    }[job]
    assert sized in env  # sizing's choice is in the pod
    for name, value in spec.items():
        if name not in overridden | {sized, "LORAFORGE_QUANTIZATION", "LORAFORGE_ENGINE"}:
            assert env[name] == value, name
    assert env["LORAFORGE_LOG_FORMAT"] == "json" and env["LORAFORGE_DEVICE"] == "cuda"
    known = JOB_SETTINGS[job].env_names()
    assert {n for n in env if n.startswith("LORAFORGE_")} <= set(known)
    if job == "train":
        assert env["LORAFORGE_QUANTIZATION"] in ("none", "int8", "nf4")  # `auto` resolved


@pytest.mark.parametrize("job", JOBS)
def test_s3_credentials_come_only_from_a_secret_reference(job: str) -> None:
    rendered = shipped(job, "--s3-endpoint", "https://s3.example:8333", "--aws-region", "eu-1")
    container = ctr(rendered)
    assert container["envFrom"] == [{"secretRef": {"name": "loraforge-s3"}}]
    env = env_of(rendered)
    assert env["AWS_ENDPOINT_URL"] == "https://s3.example:8333" and env["AWS_REGION"] == "eu-1"
    for name, value in env.items():
        assert not SECRET_NAME.search(name), name
        assert not CREDENTIAL_VALUE.search(value), name
    assert all(set(e) == {"name", "value"} for e in container["env"])  # no valueFrom either


def test_workload_identity_needs_no_secret() -> None:
    rendered = render("train", "--gpu", "a100-80gb", "--workload-identity")
    assert "envFrom" not in ctr(rendered)
    assert pod(rendered)["automountServiceAccountToken"] is False  # IRSA projects its own token
    notes = rendered["metadata"]["annotations"]
    assert notes["loraforge.dev/s3-credentials"] == "workload-identity"


def test_hf_token_comes_from_its_own_secret() -> None:
    container = ctr(shipped("train", "--hf-secret", "hf-token"))
    assert container["envFrom"] == [
        {"secretRef": {"name": "loraforge-s3"}},
        {"secretRef": {"name": "hf-token"}},
    ]


# --- strict validation --------------------------------------------------------------------


VARIANTS = {
    "catalog": ("--gpu", "a100-80gb", "--s3-secret", "s"),
    "product-and-node": ("--gpu", "L4", "--node", "n1", "--s3-secret", "s"),
    "mig": ("--gpu", "mig-3g.40gb", "--s3-secret", "s"),
    "identity": ("--gpu", "H100-80GB", "--workload-identity", "--hf-secret", "hf"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("job", JOBS)
def test_rendered_jobs_validate_strictly(job: str, variant: str) -> None:
    rendered = render(job, *VARIANTS[variant])
    for version in VERSIONS:
        kubernetes_validate.validate(rendered, version, strict=True)


@pytest.mark.parametrize("job", JOBS)
def test_cpu_jobs_validate_strictly(job: str, tmp_path: Path) -> None:
    rendered = render(
        job, "--gpu", "none", env_file=write_spec(tmp_path / "t.env", LOCAL_SPECS[job])
    )
    for version in VERSIONS:
        kubernetes_validate.validate(rendered, version, strict=True)


# --- --gpu auto through the cluster's GFD labels ------------------------------------------


def gfd(product: str, memory: int, count: int = 1) -> dict[str, str]:
    return {
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.memory": str(memory),
        "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.compute.major": "8",
    }


class FakeCluster:
    def __init__(self, nodes: list[tuple[str, dict[str, str]]]) -> None:
        self.nodes = nodes

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def list_nodes(self) -> list[tuple[str, dict[str, str]]]:
        return self.nodes


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str]]]:
    nodes: list[tuple[str, dict[str, str]]] = []

    def connect(cls: type, *args: object) -> FakeCluster:
        return FakeCluster(nodes)

    monkeypatch.setattr(client.Cluster, "connect", classmethod(connect))
    return nodes


def test_gpu_auto_takes_the_smallest_gpu_that_fits(
    cluster: list[tuple[str, dict[str, str]]],
) -> None:
    cluster += [
        ("cpu-1", {"kubernetes.io/hostname": "cpu-1"}),
        ("big-1", {**gfd("NVIDIA-A100-SXM4-80GB", 81920, 8), "kubernetes.io/hostname": "big-1"}),
        ("l4-1", {**gfd("NVIDIA-L4", 23034), "kubernetes.io/hostname": "l4-1"}),
    ]
    rendered = render("eval", "--s3-secret", "s")  # --gpu auto is the default
    assert pod(rendered)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert rendered["metadata"]["annotations"]["loraforge.dev/gpu"] == "L4"

    pinned = render("eval", "--s3-secret", "s", "--node", "big-1")
    assert pod(pinned)["nodeSelector"] == {
        "kubernetes.io/hostname": "big-1",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    }


def test_gpu_auto_on_a_mig_node_selects_its_memory_label(
    cluster: list[tuple[str, dict[str, str]]],
) -> None:
    labels = {
        **gfd("NVIDIA-A100-SXM4-80GB-MIG-3g.40gb", 40192, 2),
        "nvidia.com/mig.strategy": "single",
    }
    cluster.append(("mig-1", labels))
    rendered = render("eval", "--s3-secret", "s")
    assert pod(rendered)["nodeSelector"] == {"nvidia.com/gpu.memory": "40192"}
    assert ctr(rendered)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_gpu_auto_without_gfd_labels_is_a_permanent_error(
    cluster: list[tuple[str, dict[str, str]]],
) -> None:
    cluster.append(("cpu-1", {"kubernetes.io/os": "linux"}))
    with pytest.raises(PermanentError, match="GPU Feature Discovery labels"):
        render("train", "--s3-secret", "s")
    with pytest.raises(PermanentError, match="--node gpu-9: no such node"):
        render("train", "--s3-secret", "s", "--node", "gpu-9")


def test_gpu_auto_refuses_a_model_no_node_fits(
    cluster: list[tuple[str, dict[str, str]]], tmp_path: Path
) -> None:
    cluster.append(("t4-1", gfd("Tesla-T4", 15360)))
    spec = huge_model_spec(tmp_path)
    with pytest.raises(PermanentError, match="fits no GPU of the cluster: T4"):
        render("train", env_file=spec)


# --- bad input: exit 2, one line, through the console script ------------------------------


def llama_config(hidden: int, layers: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "intermediate_size": 4 * hidden,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


def huge_model_spec(tmp_path: Path) -> Path:
    model = tmp_path / "huge-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llama_config(hidden=32768, layers=400)))
    return write_spec(
        tmp_path / "huge.env", {**LOCAL_SPECS["train"], "LORAFORGE_BASE_MODEL": str(model)}
    )


def loraforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "loraforge"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def assert_exit_2_one_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_unknown_variable_in_a_spec_exits_2_with_a_suggestion(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "t.env", {**LOCAL_SPECS["train"], "LORAFORGE_RNAK": "8"})
    done = loraforge("render", "train", "--env-file", str(spec), "--gpu", "L4")
    assert_exit_2_one_line(done, "LORAFORGE_RNAK", "did you mean LORAFORGE_RANK?")


def test_spec_errors_come_before_the_cluster_is_asked(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "t.env", {**LOCAL_SPECS["train"], "LORAFORGE_RANK": "0"})
    done = loraforge("render", "train", "--env-file", str(spec), "--kubeconfig", "/nonexistent")
    assert_exit_2_one_line(done, "LORAFORGE_RANK=0")


def test_gpu_not_in_the_catalog_exits_2_listing_the_names() -> None:
    done = loraforge(
        "render", "train", "--env-file", "jobs/train.env", "--gpu", "rtx-9000", "--s3-secret", "s"
    )
    assert_exit_2_one_line(done, "unknown GPU 'rtx-9000'", "T4", "A100-80GB", "H100-80GB")


def test_model_that_fits_no_gpu_exits_2(tmp_path: Path) -> None:
    done = loraforge(
        "render", "train", "--env-file", str(huge_model_spec(tmp_path)), "--gpu", "B200"
    )
    assert_exit_2_one_line(done, "GiB")


def test_s3_without_credentials_exits_2_naming_the_flag() -> None:
    done = loraforge("render", "edit", "--env-file", "jobs/edit.env", "--gpu", "L4")
    assert_exit_2_one_line(done, "--s3-secret", "LORAFORGE_ADAPTER", "LORAFORGE_STORE")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("LORAFORGE_DATA", "https://user:hunter2@example.com/train.jsonl"),
        ("LORAFORGE_STORE", "s3://AKIAIOSFODNN7EXAMPLE:hunter2@bucket/runs"),
    ],
)
def test_a_credential_in_the_spec_exits_2_without_echoing_it(
    tmp_path: Path, name: str, value: str
) -> None:
    spec = write_spec(tmp_path / "t.env", {**LOCAL_SPECS["train"], name: value})
    done = loraforge("render", "train", "--env-file", str(spec), "--gpu", "L4")
    line = assert_exit_2_one_line(done, name, "Secret")
    assert value not in line and "hunter2" not in line


def test_gpu_auto_without_a_cluster_says_how_to_name_a_gpu(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "t.env", LOCAL_SPECS["train"])
    done = loraforge("render", "train", "--env-file", str(spec), "--kubeconfig", "/nonexistent")
    assert_exit_2_one_line(done, "--gpu auto", "--gpu NAME", "--gpu none")


def test_a_cpu_device_with_a_gpu_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "t.env", {**LOCAL_SPECS["train"], "LORAFORGE_DEVICE": "cpu"})
    done = loraforge("render", "train", "--env-file", str(spec), "--gpu", "L4")
    assert_exit_2_one_line(done, "LORAFORGE_DEVICE=cpu", "--gpu none")


def test_render_prints_only_yaml_on_stdout() -> None:
    done = loraforge(
        "render", "train", "--env-file", "jobs/train.env", "--gpu", "L4", "--s3-secret", "s"
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["kind"] == "Job"


# --- no torch -----------------------------------------------------------------------------


def test_the_launcher_renders_with_torch_unimportable() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import loraforge.launcher.cli, loraforge.launcher.render, loraforge.launcher.client\n"
        "import loraforge.launcher.gpus, loraforge.launcher.models, loraforge.sizing\n"
        "from loraforge.launcher.cli import main\n"
        "try:\n"
        "    main(['render', 'train', '--env-file', 'jobs/train.env', '--gpu', 'a100-80gb',\n"
        "          '--s3-secret', 'loraforge-s3'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["metadata"]["name"] == "qwen05-gsm8k-lora-train"
