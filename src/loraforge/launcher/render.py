"""Kubernetes Jobs from job specs, built as data and checked before anything reaches a cluster.

`render_job` is pure: a spec, a GPU from the catalog, the sizing plan and the options in, one
`batch/v1` Job (plain dicts) out. `render_from_args` does the looking-up around it: it reads the
spec, refuses credentials in it (first, so that no later message can echo one), validates it
with the job's own settings class (a typo fails here, before a GPU is allocated), reads the base
model's `config.json`, resolves `--gpu` (`placement.py`: a catalog name, `none` for a CPU Job, or
`auto`: the GPU Feature Discovery labels of the cluster's nodes) and plans the run for that GPU;
`scale.py` reshapes the Job for several GPUs, nodes or shards and for queues (docs/scale.md).

What every Job carries follows design.md, "Exit codes and Kubernetes semantics": the
podFailurePolicy acting on exit codes 2/75/143 and on disruptions, restricted Pod Security with
writable emptyDirs over a read-only root, the GPU limit, toleration and node selection, and S3
credentials only by reference (a Secret through `envFrom`, or the ServiceAccount's workload
identity). Credentials never appear in a spec or in a rendered Job.

Choices the design leaves open (each documented where it is made):
- `--gpu` defaults to `auto`, which needs a reachable cluster; without one the error says to
  name a catalog GPU (`loraforge gpus` lists them) or `none`. `auto` plans for each kind of GPU
  the nodes offer, smallest first, and takes the first the run fits.
- MIG slices are selected by `nvidia.com/gpu.memory` (their product names vary by MIG
  strategy); whole GPUs by `nvidia.com/gpu.product`, through a node affinity when the catalog
  knows several product names for one GPU.
- The pod's container runs `tini -- loraforge-<job>`: Kubernetes `command` replaces the image's
  ENTRYPOINT, so tini is named again to stay PID 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import yaml

from loraforge import __version__
from loraforge.errors import (
    EXIT_PERMANENT,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    PermanentError,
)
from loraforge.logs import CREDENTIAL_VALUE, SECRET_NAME
from loraforge.settings import JOB_SETTINGS, JobSettings, load_settings, read_env_file
from loraforge.settings.base import PREFIX

if TYPE_CHECKING:
    from loraforge.launcher.gpus import Gpu
    from loraforge.sizing import Plan

log = logging.getLogger("loraforge.render")

GiB = 2**30
JOBS = ("train", "edit", "eval")
DEFAULT_IMAGE = f"ghcr.io/loraforge/loraforge:{__version__}"
UID = 10001  # the image's `loraforge` user (Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB; on a MIG node, the slice's
HOSTNAME_LABEL = "kubernetes.io/hostname"

# activeDeadlineSeconds per job: generous ceilings, not estimates (override: --deadline).
DEADLINE_SECONDS = {"train": 24 * 3600, "edit": 4 * 3600, "eval": 12 * 3600}
# terminationGracePeriodSeconds: train publishes a checkpoint on SIGTERM (adapter + optimizer
# state + RNG, tens of MB to ~2 GB for large ranks) before exiting 143; edit and eval have no
# partial result to save and stop at once.
GRACE_SECONDS = {"train": 120, "edit": 30, "eval": 30}
VLLM_HOST_GIB = 8  # per GPU: vLLM's engine process and its CPU swap space (host memory)
BACKOFF_LIMIT = 3  # retries of exit 75/143 and of crashes; disruptions are not counted
TTL_SECONDS = 7 * 24 * 3600  # keep a finished Job (and its pod's log) a week for `loraforge logs`

# Paths inside the pod; every writable one is an emptyDir (the root filesystem is read-only).
POD_ENV = {
    "HOME": "/tmp",  # libraries that write under ~ (matplotlib, triton) get a writable home
    "HF_HOME": "/cache/hf",
    "XDG_CACHE_HOME": "/cache",
    "LORAFORGE_CACHE": "/cache/loraforge",
    "LORAFORGE_LOG_FORMAT": "json",
}


@dataclass(frozen=True)
class RenderOptions:
    """Everything about a Job that is not in the spec: image, where and how it runs."""

    image: str = DEFAULT_IMAGE
    namespace: str = "loraforge"
    service_account: str = "loraforge-job"  # from k8s/base: no API rights, no token
    s3_secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    hf_secret: str | None = None  # Secret with HF_TOKEN (gated models)
    workload_identity: bool = False  # S3 credentials from the ServiceAccount's role
    s3_endpoint: str | None = None
    aws_region: str | None = None
    deadline: int | None = None  # None: DEADLINE_SECONDS[job]
    backoff_limit: int = BACKOFF_LIMIT
    ttl: int = TTL_SECONDS
    node: str | None = None  # value of kubernetes.io/hostname to pin the pod to
    gpu_product: str | None = None  # GFD product label seen on the chosen node
    gpu_memory_mib: int | None = None  # GFD memory label seen on the chosen node (MIG)
    gpu_resource: str = GPU_RESOURCE  # `nvidia.com/mig-<profile>` under the mixed MIG strategy
    model_bytes: int = 0  # base weights at 16 bits: sizes host memory and the model cache
    spec_file: str | None = None  # recorded as an annotation


# --------------------------------------------------------------------------- the pure renderer


def render_job(
    job: str,
    spec: Mapping[str, str],
    *,
    gpu: Gpu | None,
    gpu_count: int,
    plan: Plan | None,
    options: RenderOptions,
) -> dict[str, Any]:
    """The Job for `spec` as data. Raises `PermanentError` for a bad spec or missing credentials."""
    check_no_credentials(job, spec)
    settings = validate_spec(job, spec)
    check_s3_access(job, settings, options)
    env = container_env(job, spec, settings, gpu=gpu, plan=plan, options=options)
    labels = recommended_labels(job, settings.run_id)
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": options.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS[job],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        **scheduling(gpu, options),
        "containers": [container(job, env, gpu_count=gpu_count, options=options)],
        "volumes": volumes(gpu_count, options.model_bytes),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(settings.run_id, job),
            "namespace": options.namespace,
            "labels": labels,
            "annotations": job_annotations(settings, gpu, plan, options),
        },
        "spec": {
            "backoffLimit": options.backoff_limit,
            "activeDeadlineSeconds": options.deadline or DEADLINE_SECONDS[job],
            "ttlSecondsAfterFinished": options.ttl,
            # a replacement pod starts only once the old one has exited (its checkpoint is out)
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": pod_failure_policy(job),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def validate_spec(job: str, spec: Mapping[str, str]) -> JobSettings:
    """The job's settings from `spec`: unknown names and bad values fail here, all at once."""
    if job not in JOB_SETTINGS:
        raise PermanentError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    return load_settings(JOB_SETTINGS[job], spec)


def job_name(run_id: str, job: str) -> str:
    """`<run id>-<job>`: a DNS label (the run id is one, at most 48 characters)."""
    name = f"{run_id}-{job}"
    if len(name) > 63:  # unreachable with the settings' max_length; kept as the invariant
        raise PermanentError(f"LORAFORGE_RUN_ID={run_id}: the Job name {name} is over 63 chars")
    return name


def recommended_labels(job: str, run_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "loraforge",
        "app.kubernetes.io/component": job,
        "app.kubernetes.io/instance": run_id,
        "app.kubernetes.io/version": _label_value(__version__),
        "app.kubernetes.io/part-of": "loraforge",
        "app.kubernetes.io/managed-by": "loraforge",
    }


def _label_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")


def pod_failure_policy(job: str) -> dict[str, Any]:
    """design.md's exit-code table. Rules apply in order: a disruption is ignored even when the
    container's exit code (143 after the SIGTERM of a drain) would match a later rule."""
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": job,
                    "operator": "In",
                    "values": [EXIT_PERMANENT],
                },
            },
            {
                "action": "Count",
                "onExitCodes": {
                    "containerName": job,
                    "operator": "In",
                    "values": [EXIT_TRANSIENT, EXIT_TERMINATED],
                },
            },
        ]
    }


def job_annotations(
    settings: JobSettings, gpu: Gpu | None, plan: Plan | None, options: RenderOptions
) -> dict[str, str]:
    notes = {"loraforge.dev/spec": options.spec_file} if options.spec_file else {}
    notes["loraforge.dev/output"] = settings.output_uri
    notes["loraforge.dev/gpu"] = "none"
    if gpu is not None:
        notes["loraforge.dev/gpu"] = gpu.name
        notes["loraforge.dev/gpu-vram-gib"] = f"{gpu.vram_gib:g}"
    if plan is not None:
        notes["loraforge.dev/estimated-peak-gib"] = f"{plan.peak_bytes / GiB:.1f}"
    if options.workload_identity:
        notes["loraforge.dev/s3-credentials"] = "workload-identity"
    elif options.s3_secret:
        notes["loraforge.dev/s3-credentials"] = f"secret/{options.s3_secret}"
    return notes


# ----------------------------------------------------------------------------------- checks


def check_no_credentials(job: str, spec: Mapping[str, str]) -> None:
    """No credential in the spec: checked first, so no later message can echo one."""
    for name, value in spec.items():
        upper = name.upper()
        secret_name = not upper.startswith(PREFIX) and SECRET_NAME.search(upper)
        if secret_name or CREDENTIAL_VALUE.search(value):
            fix = "--hf-secret NAME" if "HF" in upper else "--s3-secret NAME or --workload-identity"
            raise PermanentError(
                f"{name} in the {job} spec looks like a credential: credentials never go in a "
                f"job spec or a manifest; put it in a Kubernetes Secret and pass {fix}"
            )


def check_s3_access(job: str, settings: JobSettings, options: RenderOptions) -> None:
    """s3:// URIs need S3 credentials: a Secret or the ServiceAccount's workload identity."""
    if options.workload_identity and options.s3_secret:
        raise PermanentError("give --s3-secret or --workload-identity, not both")
    if options.s3_secret or options.workload_identity:
        return
    uses_s3 = sorted(
        PREFIX + field.upper()
        for field, value in settings.redacted().items()
        if "s3://" in json.dumps(value)
    )
    if uses_s3:
        raise PermanentError(
            f"the {job} job uses s3:// ({', '.join(uses_s3)}) but no S3 credentials were given: "
            "pass --s3-secret NAME (a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) "
            "or --workload-identity"
        )


def _check_device(job: str, device: str, gpu: Gpu | None) -> None:
    if gpu is None and device == "cuda":
        raise PermanentError(
            f"LORAFORGE_DEVICE=cuda in the {job} spec but --gpu none: name a GPU or use cpu"
        )
    if gpu is not None and device == "cpu":
        raise PermanentError(
            f"LORAFORGE_DEVICE=cpu in the {job} spec with --gpu {gpu.name}: the GPU would sit "
            "idle; use --gpu none for a CPU Job or set LORAFORGE_DEVICE=auto"
        )


# ---------------------------------------------------------------------------- the container


def container_env(
    job: str,
    spec: Mapping[str, str],
    settings: JobSettings,
    *,
    gpu: Gpu | None,
    plan: Plan | None,
    options: RenderOptions,
) -> list[dict[str, str]]:
    """Plain env only (no secret values): the spec's LORAFORGE_* settings with the sizing plan's
    choices over them, then the pod's paths. The result is validated by the settings class."""
    _check_device(job, settings.device, gpu)
    settings_env = {k.upper(): v for k, v in spec.items() if k.upper().startswith(PREFIX)}
    settings_env[PREFIX + "RUN_ID"] = settings.run_id  # a default run id would differ per pod
    settings_env.update(plan.env if plan is not None else {})
    settings_env[PREFIX + "DEVICE"] = "cuda" if gpu is not None else "cpu"  # no silent CPU run
    pod_env = dict(POD_ENV)
    settings_env.update({k: pod_env.pop(k) for k in list(pod_env) if k.startswith(PREFIX)})
    validate_spec(job, settings_env)  # every rendered LORAFORGE_* name is a field

    other = {k: v for k, v in spec.items() if not k.upper().startswith(PREFIX)}
    if options.s3_endpoint:
        other["AWS_ENDPOINT_URL"] = options.s3_endpoint
    if options.aws_region:
        other["AWS_REGION"] = options.aws_region
    other.update(pod_env)  # the pod's paths win over a spec's
    env = sorted(settings_env.items()) + sorted(other.items())
    return [{"name": name, "value": value} for name, value in env]


def container(
    job: str, env: list[dict[str, str]], *, gpu_count: int, options: RenderOptions
) -> dict[str, Any]:
    secrets = [s for s in (options.s3_secret, options.hf_secret) if s]
    values = {e["name"]: e["value"] for e in env}
    engine = values.get(PREFIX + "ENGINE", "auto")  # eval's default engine is auto
    vllm = job == "eval" and gpu_count > 0 and engine != "transformers"
    spec: dict[str, Any] = {
        "name": job,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/bin/tini", "--", f"loraforge-{job}"],
        "workingDir": "/work",
        "env": env,
    }
    if secrets:
        spec["envFrom"] = [{"secretRef": {"name": name}} for name in secrets]
    spec |= {
        "resources": resources(gpu_count, options.model_bytes, options.gpu_resource, vllm=vllm),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "work", "mountPath": "/work"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    return spec


def host_memory_gib(model_bytes: int, gpu_count: int, *, vllm: bool = False) -> int:
    """Host memory of the container (request = limit: a Job is not a burstable workload).

    On a GPU the weights stream from the safetensors files to the device a shard at a time, so
    the host holds the runtime (~6 GiB: Python, torch, CUDA libraries, tokenizer, data) plus a
    quarter of the weights for loader peaks. On the CPU the model lives in host memory in fp32
    (twice the 16-bit size), with as much again for activations and the adapter's optimizer.
    vLLM adds its engine process (a second runtime) and its 4 GiB of CPU swap space per GPU.
    `/dev/shm` is counted on top by `resources` (a memory emptyDir is charged to the pod).
    """
    weights = model_bytes / GiB
    need = 6 + 0.25 * weights if gpu_count else 4 + 4 * weights
    if vllm:
        need += VLLM_HOST_GIB * gpu_count
    return max(8, math.ceil(need))


def shm_gib(gpu_count: int) -> int:
    """`/dev/shm` for DataLoader workers and NCCL/vLLM shared buffers."""
    return 2 * max(1, gpu_count)


def resources(
    gpu_count: int, model_bytes: int, gpu_resource: str, *, vllm: bool = False
) -> dict[str, Any]:
    """CPU and memory requests and limits; the GPU as a limit (extended resources take no
    separate request). 4 cores per GPU feed tokenization and host-side work; the CPU limit is
    twice the request so bursts (loading, saving) are not throttled."""
    cpu = 4 * gpu_count if gpu_count else 2
    memory = f"{host_memory_gib(model_bytes, gpu_count, vllm=vllm) + shm_gib(gpu_count)}Gi"
    requests = {"cpu": str(cpu), "memory": memory}
    limits = {"cpu": str(2 * cpu), "memory": memory}
    if gpu_count:
        limits[gpu_resource] = str(gpu_count)
    return {"requests": requests, "limits": limits}


def volumes(gpu_count: int, model_bytes: int) -> list[dict[str, Any]]:
    """Writable emptyDirs: /tmp, /cache (HF_HOME: the base model's download, with room for
    datasets and adapters), /work (scratch: outputs and checkpoints before publishing) and
    /dev/shm in memory."""
    model_gib = math.ceil(model_bytes / GiB)
    return [
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": f"{model_gib + 20}Gi"}},
        {"name": "work", "emptyDir": {"sizeLimit": "20Gi"}},
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(gpu_count)}Gi"},
        },
    ]


def scheduling(gpu: Gpu | None, options: RenderOptions) -> dict[str, Any]:
    """nodeSelector (GFD labels, the pinned node), affinity and tolerations of the pod."""
    selector: dict[str, str] = {}
    if options.node:
        selector[HOSTNAME_LABEL] = options.node
    out: dict[str, Any] = {}
    if gpu is not None:
        if options.gpu_resource != GPU_RESOURCE:
            pass  # mixed MIG strategy: the resource `nvidia.com/mig-<profile>` selects the node
        elif gpu.mig:  # single MIG strategy: the slice's memory, not its product name
            selector[MEMORY_LABEL] = str(options.gpu_memory_mib or mig_memory_mib(gpu))
        elif options.gpu_product or len(gpu.products) == 1:
            selector[PRODUCT_LABEL] = options.gpu_product or gpu.products[0]
        else:  # several product names for one catalog GPU (SXM, PCIe, ...): any of them
            out["affinity"] = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": PRODUCT_LABEL,
                                        "operator": "In",
                                        "values": list(gpu.products),
                                    }
                                ]
                            }
                        ]
                    }
                }
            }
        out["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if selector:
        out = {"nodeSelector": selector, **out}
    return out


def mig_memory_mib(gpu: Gpu) -> int:
    """The `nvidia.com/gpu.memory` value (MiB) of a MIG slice from the catalog's size."""
    return round(gpu.vram_gib * 1024)


# ------------------------------------------------------------------------- looking things up


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `loraforge render` (and of the commands that render before submitting)."""
    parser.add_argument("--env-file", required=True, help="the job spec (jobs/<job>.env)")
    parser.add_argument(
        "--gpu",
        default="auto",
        metavar="NAME|auto|none",
        help="a GPU from `loraforge gpus`; `auto` (default) reads the cluster nodes' GPU "
        "Feature Discovery labels and takes the smallest GPU the run fits; `none`: a CPU Job",
    )
    parser.add_argument(
        "--node",
        default=None,
        help="pin the pod to this node (with --gpu auto, its labels decide the GPU)",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="default: %(default)s")
    parser.add_argument("--namespace", default="loraforge", help="default: %(default)s")
    parser.add_argument(
        "--service-account", default="loraforge-job", help="default: %(default)s (k8s/base)"
    )
    creds = parser.add_mutually_exclusive_group()
    creds.add_argument(
        "--s3-secret",
        default=None,
        metavar="NAME",
        help="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (envFrom)",
    )
    creds.add_argument(
        "--workload-identity",
        action="store_true",
        help="S3 credentials from the ServiceAccount's cloud role (IRSA, GKE Workload Identity)",
    )
    parser.add_argument(
        "--hf-secret", default=None, metavar="NAME", help="Secret holding HF_TOKEN (gated models)"
    )
    parser.add_argument("--s3-endpoint", default=None, metavar="URL", help="AWS_ENDPOINT_URL")
    parser.add_argument("--aws-region", default=None, metavar="REGION", help="AWS_REGION")
    parser.add_argument(
        "--deadline",
        type=_positive_int,
        default=None,
        metavar="SECONDS",
        help="activeDeadlineSeconds (default: train 86400, edit 14400, eval 43200)",
    )
    parser.add_argument(
        "--backoff-limit",
        type=_non_negative_int,
        default=BACKOFF_LIMIT,
        help="default: %(default)s",
    )
    parser.add_argument(
        "--ttl",
        type=_non_negative_int,
        default=TTL_SECONDS,
        metavar="SECONDS",
        help="ttlSecondsAfterFinished (default: %(default)s, a week)",
    )
    parser.add_argument("--kubeconfig", default=None, help="for --gpu auto (default: ~/.kube)")
    parser.add_argument("--context", default=None, help="kubeconfig context for --gpu auto")
    from loraforge.launcher.scale import add_scale_arguments

    add_scale_arguments(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 or more")
    return value


def render_from_args(job: str, args: argparse.Namespace) -> dict[str, Any]:
    """Read, validate, size and render: what `loraforge render <job>` prints (a Job, or a List of
    the objects a multi-node or queued run needs: `scale.render`)."""
    from loraforge.launcher import models, placement, scale

    spec = read_env_file(args.env_file)
    check_no_credentials(job, spec)
    settings = validate_spec(job, spec)  # before the hub, the catalog or the cluster is asked
    options = RenderOptions(
        image=args.image,
        namespace=args.namespace,
        service_account=args.service_account,
        s3_secret=args.s3_secret,
        hf_secret=args.hf_secret,
        workload_identity=args.workload_identity,
        s3_endpoint=args.s3_endpoint,
        aws_region=args.aws_region,
        deadline=args.deadline,
        backoff_limit=args.backoff_limit,
        ttl=args.ttl,
        node=args.node,
        spec_file=str(args.env_file),
    )
    check_s3_access(job, settings, options)
    layout = scale.layout_from(job, spec, settings, args)
    config = models.read_config(settings.base_model, settings.base_revision)
    options = replace(options, model_bytes=placement.weight_bytes(config))
    if layout.merge:  # merging the shards' predictions needs no GPU
        gpu, plan = None, None
    else:
        gpu, plan, options = placement.resolve_gpu(
            job, args, config, settings, options, layout.plan_gpus
        )
    rendered = scale.render(job, spec, layout, gpu=gpu, plan=plan, options=options)
    if not settings.output_uri.startswith("s3://"):  # fine for a kind cluster's smoke test
        log.warning(
            f"{settings.output_uri} is a local path: the pod's output is lost with its emptyDir; "
            "set LORAFORGE_STORE to an s3:// prefix"
        )
    return rendered


class _Dumper(yaml.SafeDumper):
    """Writes shared dicts (the labels) out in full: no `&id001` anchors in a manifest."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(job: Mapping[str, Any]) -> str:
    """The Job as YAML, fields in the order they were built; a List as one document per item,
    in creation order (what `kubectl apply -f` and `loraforge submit` take)."""
    docs = job["items"] if job.get("kind") == "List" else [job]
    return "---\n".join(
        yaml.dump(dict(d), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)
        for d in docs
    )
