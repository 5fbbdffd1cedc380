"""Scale-out renders (issue #12): multi-GPU, multi-node (Indexed Job, TrainJob, PyTorchJob),
sharded eval and Kueue. Core objects validate strictly across the supported Kubernetes versions
and pass checkov; the Kubeflow custom resources validate against the vendored CRD schemas
(tests/schemas/README.md), and the pods they make pass checkov once unwrapped (checkov itself
skips kinds it does not know)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from loraforge.errors import PermanentError
from loraforge.launcher.client import Cluster
from loraforge.launcher.render import GRACE_SECONDS, to_yaml
from loraforge.launcher.scale import items
from tests.test_client import write_kubeconfig
from tests.test_k8s import CHECKOV, ROOT, VERSIONS
from tests.test_render import LOCAL_SPECS, render, write_spec
from tests.test_render import ctr as container
from tests.test_render import pod as pod_spec

MULTI = "jobs/train.multigpu.env"  # 2 nodes x 4 GPUs
SHARDED = "jobs/eval.sharded.env"  # 8 shards
S3 = ("--gpu", "a100-80gb", "--s3-secret", "loraforge-s3")
INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
EXIT_RULES = [
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "FailJob", "onExitCodes": {"containerName": "", "operator": "In", "values": [2]}},
    {
        "action": "Count",
        "onExitCodes": {"containerName": "", "operator": "In", "values": [75, 143]},
    },
]


def rules(job: str) -> list[dict[str, Any]]:
    out = copy.deepcopy(EXIT_RULES)
    for rule in out[1:]:
        rule["onExitCodes"]["containerName"] = job
    return out


def by_kind(rendered: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in items(rendered)}


def env(ctr: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in ctr["env"]}


def train_spec(tmp_path: Path, name: str = "train.env", **values: str) -> Path:
    spec = {**LOCAL_SPECS["train"], **{f"LORAFORGE_{k.upper()}": v for k, v in values.items()}}
    return write_spec(tmp_path / name, spec)


# --- multi-GPU on one node ------------------------------------------------------------------


def test_one_gpu_keeps_the_plain_command(tmp_path: Path) -> None:
    job = render("train", "--gpu", "L4", env_file=train_spec(tmp_path, gpus="1"))
    assert container(job)["command"] == ["/usr/bin/tini", "--", "loraforge-train"]
    assert job["kind"] == "Job" and "completionMode" not in job["spec"]


def test_n_gpus_run_torchrun_with_n_gpus_and_room_to_stop(tmp_path: Path) -> None:
    spec = train_spec(tmp_path, gpus="4", grad_accum="4")
    one = render("train", "--gpu", "L4", env_file=train_spec(tmp_path, "one.env", gpus="1"))
    job = render("train", "--gpu", "L4", env_file=spec)
    ctr = container(job)
    assert ctr["command"] == [
        "/usr/bin/tini",
        "--",
        "loraforge-torchrun",
        "--nproc-per-node=4",
        f"--shutdown-timeout={GRACE_SECONDS['train'] - 15}",
        "-m",
        "loraforge.train",
    ]
    assert 0 < GRACE_SECONDS["train"] - 15 < pod_spec(job)["terminationGracePeriodSeconds"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "4"
    shm = {v["name"]: v for v in pod_spec(job)["volumes"]}["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "8Gi"}  # 2 GiB per process
    gib = [int(container(j)["resources"]["limits"]["memory"][:-2]) for j in (one, job)]
    assert gib[1] >= 4 * (gib[0] - 2)  # a runtime per process
    assert env(ctr)["LORAFORGE_GPUS"] == "4"
    assert job["spec"]["podFailurePolicy"]["rules"] == rules("train")


# --- multi-node: Indexed Job + headless Service --------------------------------------------


def test_indexed_multi_node_job_and_its_service() -> None:
    rendered = render("train", *S3, env_file=MULTI)
    assert rendered["kind"] == "List"
    assert [o["kind"] for o in rendered["items"]] == ["Service", "NetworkPolicy", "Job"]
    objs = by_kind(rendered)
    job, service = objs["Job"], objs["Service"]
    name = "qwen7b-gsm8k-ddp-train"
    assert job["metadata"]["name"] == service["metadata"]["name"] == name
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["podFailurePolicy"]["rules"] == rules("train")  # every Job semantic kept
    assert (spec["backoffLimit"], spec["podReplacementPolicy"]) == (3, "Failed")
    assert pod_spec(job)["subdomain"] == name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == 29500
    ctr = container(job)
    assert ctr["command"][2:8] == [
        "loraforge-torchrun",
        "--nnodes=2",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={name}-0.{name}",
        "--master-port=29500",
        "--nproc-per-node=4",
    ]
    assert env(ctr)["JOB_COMPLETION_INDEX"] == {"fieldRef": {"fieldPath": INDEX_PATH}}
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod_spec(job)["automountServiceAccountToken"] is False
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_run_pods_may_reach_each_other_and_nothing_more() -> None:
    policy = by_kind(render("train", *S3, env_file=MULTI))["NetworkPolicy"]
    peers = {
        "app.kubernetes.io/instance": "qwen7b-gsm8k-ddp",
        "app.kubernetes.io/component": "train",
    }
    assert policy["spec"]["podSelector"] == {"matchLabels": peers}
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": peers}}]
    assert policy["spec"]["egress"][0]["to"] == [{"podSelector": {"matchLabels": peers}}]


def test_a_run_id_starting_with_a_digit_cannot_name_a_service(tmp_path: Path) -> None:
    spec = train_spec(tmp_path, run_id="7b-run", gpus="2", nodes="2", grad_accum="4")
    for engine in ("indexed", "trainjob", "pytorchjob"):
        with pytest.raises(PermanentError, match="must start with a letter"):
            render("train", "--gpu", "L4", "--engine", engine, env_file=spec)


# --- multi-node: Kubeflow TrainJob and PyTorchJob ------------------------------------------


def test_trainjob_on_the_torch_runtime() -> None:
    objs = by_kind(render("train", *S3, "--engine", "trainjob", env_file=MULTI))
    assert by_kind(render("train", *S3, "--engine", "kubeflow", env_file=MULTI)) == objs
    assert set(objs) == {"NetworkPolicy", "TrainJob"}
    tj = objs["TrainJob"]
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = tj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"][2:] == [
        "loraforge-torchrun",  # the Trainer's PET_* variables give nnodes, node rank, master
        f"--shutdown-timeout={GRACE_SECONDS['train'] - 15}",
        "-m",
        "loraforge.train",
    ]
    secrets = {e["name"]: e["valueFrom"] for e in trainer["env"] if "valueFrom" in e}
    assert secrets["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "loraforge-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    [patch] = tj["spec"]["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "cache", "work", "dshm"}
    assert pod["containers"][0]["name"] == "node"
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_pytorchjob_master_and_workers() -> None:
    objs = by_kind(render("train", *S3, "--engine", "pytorchjob", env_file=MULTI))
    ptj = objs["PyTorchJob"]
    spec = ptj["spec"]
    assert spec["nprocPerNode"] == "4"
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}
    [ctr] = replicas["Worker"]["template"]["spec"]["containers"]
    assert ctr["name"] == "pytorch"  # the operator requires it
    assert "--nproc-per-node=4" not in ctr["command"]  # PET_NPROC_PER_NODE from nprocPerNode
    assert spec["runPolicy"] == {
        "backoffLimit": 3,
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": 604800,
        "cleanPodPolicy": "Running",
    }


def test_engine_applies_to_train_only() -> None:
    with pytest.raises(PermanentError, match="--engine applies to `render train`"):
        render("eval", *S3, "--engine", "trainjob")


# --- sharded eval -----------------------------------------------------------------------------


def test_sharded_eval_is_an_indexed_job_with_retries_per_shard() -> None:
    job = render("eval", *S3, env_file=SHARDED)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 8, 8)
    assert (spec["backoffLimitPerIndex"], spec["backoffLimit"]) == (3, 24)
    assert spec["podFailurePolicy"]["rules"] == rules("eval")
    values = env(container(job))
    assert values["LORAFORGE_SHARDS"] == "8" and "LORAFORGE_SHARD" not in values
    assert values["JOB_COMPLETION_INDEX"] == {"fieldRef": {"fieldPath": INDEX_PATH}}
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_shards_and_parallelism_flags() -> None:
    job = render("eval", *S3, "--shards", "3", "--parallelism", "2")
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 2)
    assert env(container(job))["LORAFORGE_SHARDS"] == "3"
    with pytest.raises(PermanentError, match="--parallelism 4 is more than the 3 shards"):
        render("eval", *S3, "--shards", "3", "--parallelism", "4")
    with pytest.raises(PermanentError, match="apply to eval"):
        render("train", *S3, "--shards", "2")


def test_merge_job_runs_on_the_cpu() -> None:
    job = render("eval", "--s3-secret", "loraforge-s3", "--merge", env_file=SHARDED)
    assert job["metadata"]["name"] == "qwen7b-gsm8k-sharded-eval-merge"
    assert "completionMode" not in job["spec"]
    values = env(container(job))
    assert (values["LORAFORGE_SHARD"], values["LORAFORGE_SHARDS"]) == ("merge", "8")
    assert values["LORAFORGE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    with pytest.raises(PermanentError, match="--merge needs a sharded eval"):
        render("eval", *S3, "--merge")


def test_tensor_parallel_gives_the_pod_t_gpus_and_sizes_for_them(tmp_path: Path) -> None:
    values = {
        **LOCAL_SPECS["eval"],
        "LORAFORGE_BASE_MODEL": "meta-llama/Llama-3.1-8B-Instruct",
        "LORAFORGE_ENGINE": "vllm",
    }
    with pytest.raises(PermanentError, match="does not fit L4"):
        render("eval", "--gpu", "L4", env_file=write_spec(tmp_path / "one.env", values))
    spec = write_spec(tmp_path / "tp.env", {**values, "LORAFORGE_TENSOR_PARALLEL": "2"})
    job = render("eval", "--gpu", "L4", env_file=spec)
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert env(container(job))["LORAFORGE_TENSOR_PARALLEL"] == "2"


# --- queues ----------------------------------------------------------------------------------


def test_queue_labels_and_creates_suspended() -> None:
    flags = ("--queue", "team-a", "--workload-priority-class", "paper")
    job = render("eval", *S3, *flags, "--priority-class", "batch-low", env_file=SHARDED)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "paper"
    assert job["spec"]["suspend"] is True
    assert pod_spec(job)["priorityClassName"] == "batch-low"
    assert not any("kueue" in key for key in job["spec"]["template"]["metadata"]["labels"])
    tj = by_kind(render("train", *S3, *flags, "--engine", "trainjob", env_file=MULTI))
    assert tj["TrainJob"]["spec"]["suspend"] is True
    assert tj["TrainJob"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in tj["NetworkPolicy"]["metadata"]["labels"]
    ptj = by_kind(
        render(
            "train", *S3, *flags, "--priority-class", "p", "--engine", "pytorchjob", env_file=MULTI
        )
    )
    assert ptj["PyTorchJob"]["spec"]["runPolicy"]["suspend"] is True
    for replica in ptj["PyTorchJob"]["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["priorityClassName"] == "p"
    with pytest.raises(PermanentError, match="--workload-priority-class"):
        render("train", *S3, "--priority-class", "p", "--engine", "trainjob", env_file=MULTI)


def test_no_queue_no_suspend() -> None:
    assert "suspend" not in render("eval", *S3, env_file=SHARDED)["spec"]


# --- validation: core objects strictly, custom resources against the vendored CRDs ----------


CORE_RENDERS = {
    "multi-gpu": ("train", MULTI, ("--engine", "indexed")),
    "sharded": ("eval", SHARDED, ("--queue", "q", "--priority-class", "p", "--parallelism", "4")),
    "merge": ("eval", SHARDED, ("--merge",)),
    "trainjob-peers": ("train", MULTI, ("--engine", "trainjob")),
}


@cache
def rendered(job: str, spec: str, flags: tuple[str, ...]) -> dict[str, Any]:
    return render(job, *S3, *flags, env_file=spec)


def single_node(tmp_path: Path) -> dict[str, Any]:
    spec = train_spec(tmp_path, gpus="8", grad_accum="8")
    return render("train", "--gpu", "H100-80GB", "--queue", "q", env_file=spec)


@pytest.mark.parametrize("variant", CORE_RENDERS)
def test_core_objects_validate_strictly(variant: str) -> None:
    for obj in items(rendered(*CORE_RENDERS[variant])):
        if obj["kind"] in ("TrainJob", "PyTorchJob"):
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_multi_gpu_job_validates_strictly(tmp_path: Path) -> None:
    job = single_node(tmp_path)
    for version in VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


SCHEMAS = {"TrainJob": "trainjob-v1alpha1.yaml", "PyTorchJob": "pytorchjob-v1.yaml"}


@cache
def crd_validator(kind: str, version: str) -> jsonschema.Draft202012Validator:
    """The vendored schema, its core-type $refs resolved to kubernetes-validate's strict
    definitions of `version`."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((folder / f"v{version}-local-strict" / "_definitions.json").read_text())
    schema = yaml.safe_load((ROOT / "tests" / "schemas" / SCHEMAS[kind]).read_text())
    registry: Registry[Any] = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def custom_resources() -> list[dict[str, Any]]:
    flags = ("--queue", "q", "--workload-priority-class", "w")
    return [
        by_kind(rendered("train", MULTI, ("--engine", "trainjob", *flags)))["TrainJob"],
        by_kind(rendered("train", MULTI, ("--engine", "pytorchjob", *flags)))["PyTorchJob"],
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_custom_resources_validate_against_the_vendored_crds(version: str) -> None:
    for obj in custom_resources():
        crd_validator(obj["kind"], version).validate(obj)
        assert len(obj["metadata"]["name"]) <= 63  # the TrainJob CRD's CEL rules
        assert obj["metadata"]["name"][0].isalpha()


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("TrainJob", ("spec", "trainer", "numNode")),
        (
            "TrainJob",
            (
                "spec",
                "runtimePatches",
                0,
                "trainingRuntimeSpec",
                "template",
                "spec",
                "replicatedJobs",
                0,
                "template",
                "spec",
                "template",
                "spec",
                "volumes",
                0,
                "emptyDirr",
            ),
        ),
        ("PyTorchJob", ("spec", "runPolicy", "backofLimit")),
        (
            "PyTorchJob",
            (
                "spec",
                "pytorchReplicaSpecs",
                "Master",
                "template",
                "spec",
                "containers",
                0,
                "securityContex",
            ),
        ),
    ],
)
def test_the_vendored_crds_reject_a_misspelt_field(kind: str, path: tuple[Any, ...]) -> None:
    obj = copy.deepcopy(next(o for o in custom_resources() if o["kind"] == kind))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(kind, VERSIONS[-1]).validate(obj)


# --- policy: checkov on the core objects and on the custom resources' pods -----------------


def pod_job(name: str, meta: dict[str, Any], spec: dict[str, Any], **notes: str) -> dict[str, Any]:
    """A pod of a custom resource as a batch Job, the kind checkov knows (its probe checks are
    for Pods of long-running services, not for a batch pod)."""
    metadata = {"name": name, "namespace": "loraforge", "labels": meta["labels"]}
    if notes:
        metadata["annotations"] = notes
    template = {"metadata": {"labels": meta["labels"]}, "spec": spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {"template": template},
    }


def trainjob_pod(tj: dict[str, Any]) -> dict[str, Any]:
    """The pod a TrainJob's node gets from loraforge: trainer fields + runtime patch. What only
    the ClusterTrainingRuntime sets (the service account token) is skipped, with the reason."""
    trainer = tj["spec"]["trainer"]
    [patch] = tj["spec"]["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = node["template"]["spec"]["template"]
    spec = dict(template["spec"])
    [ctr_patch] = spec.pop("containers")
    ctr = {
        "name": ctr_patch["name"],
        "image": trainer["image"],
        "imagePullPolicy": "IfNotPresent",
        "command": trainer["command"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        "securityContext": ctr_patch["securityContext"],
        "volumeMounts": ctr_patch["volumeMounts"],
    }
    why = "set by the ClusterTrainingRuntime, which loraforge does not render (docs/scale.md)"
    return pod_job(
        f"{tj['metadata']['name']}-node",
        template["metadata"],
        {**spec, "restartPolicy": "Never", "containers": [ctr]},
        **{"checkov.io/skip1": f"CKV_K8S_38={why}"},
    )


def pytorchjob_pods(ptj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        pod_job(
            f"{ptj['metadata']['name']}-{role.lower()}",
            r["template"]["metadata"],
            r["template"]["spec"],
        )
        for role, r in ptj["spec"]["pytorchReplicaSpecs"].items()
    ]


def test_custom_resources_pods_validate_strictly() -> None:
    tj, ptj = custom_resources()
    for pod in [trainjob_pod(tj), *pytorchjob_pods(ptj)]:
        for version in VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)


def test_rendered_objects_pass_checkov(tmp_path: Path) -> None:
    """One checkov run over every render (checkov ignores TrainJob/PyTorchJob: their pods go in
    unwrapped), beside k8s/base's NetworkPolicy as in a deployment."""
    assert CHECKOV.exists(), "checkov is not installed: run `make tools` (it lives in .venv-tools)"
    docs = [obj for args in CORE_RENDERS.values() for obj in items(rendered(*args))]
    docs = [d for d in docs if d["kind"] not in ("TrainJob", "PyTorchJob")]
    tj, ptj = custom_resources()
    docs += [trainjob_pod(tj), *pytorchjob_pods(ptj), single_node(tmp_path)]
    folder = tmp_path / "k8s"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(to_yaml(doc))
    base = ROOT / "k8s" / "base" / "networkpolicy.yaml"
    (folder / "networkpolicy.yaml").write_text(base.read_text())
    done = subprocess.run(
        [
            str(CHECKOV),
            "--framework",
            "kubernetes",
            "-d",
            str(folder),
            "--config-file",
            str(ROOT / ".checkov.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the committed examples -----------------------------------------------------------------


def test_scale_examples_are_committed() -> None:
    names = {p.name for p in (ROOT / "k8s" / "examples").glob("*.yaml")}
    assert {
        "train-multinode.yaml",
        "train-trainjob.yaml",
        "train-pytorchjob.yaml",
        "eval-sharded.yaml",
        "eval-merge.yaml",
    } <= names


def test_committed_custom_resources_validate_against_the_vendored_crds() -> None:
    docs = [
        doc
        for path in sorted((ROOT / "k8s").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") in SCHEMAS
    ]
    assert {doc["kind"] for doc in docs} == set(SCHEMAS)
    for doc in docs:
        crd_validator(doc["kind"], VERSIONS[0]).validate(doc)


# --- submit: every object of a render, in order ---------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Answers any create (POST) with the object, as the API server does, and records it."""

    protocol_version = "HTTP/1.1"
    created: list[tuple[str, dict[str, Any]]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.created.append((self.path, body))
        data = json.dumps(body).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("engine", ["indexed", "pytorchjob", "trainjob"])
def test_submit_creates_every_object_in_order(tmp_path: Path, engine: str) -> None:
    created: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (_Recorder,), {"created": created})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        objs = items(rendered("train", MULTI, ("--engine", engine)))
        with Cluster.connect(kubeconfig=str(kubeconfig)) as cluster:
            names = [cluster.create(obj) for obj in objs]
    finally:
        server.shutdown()
        server.server_close()
    assert [body for _, body in created] == objs
    assert names[-1] == "qwen7b-gsm8k-ddp-train"
    paths = [path for path, _ in created]
    ns = "/namespaces/loraforge/"
    policies = f"/apis/networking.k8s.io/v1{ns}networkpolicies"
    expected = {
        "indexed": [f"/api/v1{ns}services", policies, f"/apis/batch/v1{ns}jobs"],
        "pytorchjob": [policies, f"/apis/kubeflow.org/v1{ns}pytorchjobs"],
        "trainjob": [policies, f"/apis/trainer.kubeflow.org/v1alpha1{ns}trainjobs"],
    }
    assert paths == expected[engine]


def test_scale_renders_with_torch_unimportable() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from loraforge.launcher.cli import main\n"
        "for extra in (['--engine', 'trainjob'], ['--engine', 'pytorchjob'], []):\n"
        "    try:\n"
        "        main(['render', 'train', '--env-file', 'jobs/train.multigpu.env', '--gpu',\n"
        "              'a100-80gb', '--s3-secret', 's', *extra])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "    print('---', flush=True)\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(done.stdout) if doc]
    assert kinds.count("TrainJob") == kinds.count("PyTorchJob") == kinds.count("Job") == 1
