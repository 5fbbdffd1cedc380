"""Scale-out rendering (issue #12): multi-GPU and multi-node training, sharded eval, Kueue queues.

`render.render_job` builds the one-pod Job every job runs as; this module reshapes it, as data:

- train, LORAFORGE_GPUS=N on one node: the same Job under `loraforge-torchrun --nproc-per-node=N`
  with N GPUs, host memory for N processes and /dev/shm for N.
- train, LORAFORGE_NODES=M > 1, `--engine`:
  `indexed` (default) an Indexed Job (completions = parallelism = M) plus a headless Service
  for the pods' DNS names and a NetworkPolicy opening the pods of the run to each other (the
  base policy of k8s/base takes no inbound traffic), with torchrun's static rendezvous on
  pod 0; `trainjob` a Kubeflow Trainer v2 TrainJob on the `torch-distributed` runtime;
  `pytorchjob` a Kubeflow Training Operator v1 PyTorchJob (Master + Workers); these two are
  built in `kubeflow.py`, with the run's NetworkPolicy beside them.
- eval, LORAFORGE_SHARDS=N > 1 (or `--shards N`): an Indexed Job of N shards, each shard's
  retries counted apart (backoffLimitPerIndex); `--merge` renders the CPU Job that merges the
  published shards again (LORAFORGE_SHARD=merge); LORAFORGE_TENSOR_PARALLEL=T gives each pod
  T GPUs and sizes vLLM for their pooled memory.
- `--queue` (Kueue's queue-name label, created suspended), `--priority-class` (the pods'
  PriorityClass) and `--workload-priority-class` (Kueue's WorkloadPriorityClass label).

Several objects render as a `v1` List; `render.to_yaml` prints a List as one YAML document
per object, in the order they must be created (`kubectl apply -f` and `loraforge submit`).
docs/scale.md tells how to run each and what each engine does on a failure.
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from loraforge.errors import PermanentError
from loraforge.launcher.render import (
    GRACE_SECONDS,
    RenderOptions,
    host_memory_gib,
    render_job,
    shm_gib,
)
from loraforge.settings.base import PREFIX

if TYPE_CHECKING:
    from loraforge.launcher.gpus import Gpu
    from loraforge.settings import JobSettings
    from loraforge.sizing import Plan

ENGINES = ("indexed", "trainjob", "pytorchjob", "kubeflow")  # kubeflow: the current (trainjob)
RDZV_PORT = 29500  # torchrun's default master port
# torchrun forwards SIGTERM to its workers and waits this long before SIGKILL; the kubelet kills
# everything at terminationGracePeriodSeconds, so rank 0's checkpoint must be out before both.
SHUTDOWN_MARGIN = 15
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods by the Job controller
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOAD_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a WorkloadPriorityClass name
TRAINER_RUNTIME = "torch-distributed"  # --engine trainjob's default runtime
RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Layout:
    """How many pods of how many GPUs a job runs as, and how the cluster queues it."""

    job: str
    gpus: int = 1  # GPUs (and, for train, processes) per pod
    nodes: int = 1  # train: pods training together
    engine: str = "job"  # job | indexed | trainjob | pytorchjob
    runtime: str = TRAINER_RUNTIME
    shards: int = 1  # eval: completions of the Indexed Job
    parallelism: int | None = None
    merge: bool = False
    queue: str | None = None
    priority_class: str | None = None
    workload_priority_class: str | None = None

    @property
    def plan_gpus(self) -> int:
        """GPUs one model instance spans for sizing: vLLM's tensor parallel size for eval; a
        data-parallel training process holds the whole model on one GPU."""
        return self.gpus if self.job == "eval" else 1


# ---------------------------------------------------------------------------------- flags


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags of `loraforge render` and `loraforge submit` (docs/scale.md)."""
    group = parser.add_argument_group("scale-out (docs/scale.md)")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="train with LORAFORGE_NODES > 1: an Indexed Job + headless Service (indexed, the "
        "default), a Kubeflow Trainer v2 TrainJob (trainjob, or kubeflow) or a Kubeflow "
        "Training Operator v1 PyTorchJob",
    )
    group.add_argument(
        "--runtime",
        default=TRAINER_RUNTIME,
        metavar="NAME",
        help="--engine trainjob: the ClusterTrainingRuntime (default: %(default)s)",
    )
    group.add_argument(
        "--shards", type=_positive, default=None, metavar="N", help="eval: LORAFORGE_SHARDS"
    )
    group.add_argument(
        "--parallelism",
        type=_positive,
        default=None,
        metavar="P",
        help="sharded eval: shards running at once (default: all)",
    )
    group.add_argument(
        "--merge",
        action="store_true",
        help="sharded eval: the CPU Job merging the published shards (LORAFORGE_SHARD=merge)",
    )
    group.add_argument(
        "--queue", default=None, metavar="NAME", help="Kueue LocalQueue; created suspended"
    )
    group.add_argument(
        "--priority-class", default=None, metavar="NAME", help="the pods' PriorityClass"
    )
    group.add_argument(
        "--workload-priority-class",
        default=None,
        metavar="NAME",
        help="Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-class)",
    )


SCALE_FLAGS = (
    "engine",
    "runtime",
    "shards",
    "parallelism",
    "merge",
    "queue",
    "priority_class",
    "workload_priority_class",
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number")
    return value


def layout_from(
    job: str, spec: Mapping[str, str], settings: JobSettings, args: argparse.Namespace
) -> Layout:
    """The layout the spec and the flags ask for; PermanentError for flags that do not apply.
    A namespace without the scale flags (a caller's own) means none of them."""
    flag: dict[str, Any] = {name: getattr(args, name, None) for name in SCALE_FLAGS}
    if flag["engine"] and job != "train":
        raise PermanentError(f"--engine applies to `render train`, not to {job}")
    if job != "eval" and (flag["shards"] or flag["parallelism"] or flag["merge"]):
        raise PermanentError(f"--shards, --parallelism and --merge apply to eval, not to {job}")
    common: dict[str, Any] = {
        k: flag[k] for k in ("queue", "priority_class", "workload_priority_class")
    }
    if job == "train":
        gpus, nodes = int(getattr(settings, "gpus", 1)), int(getattr(settings, "nodes", 1))
        engine = flag["engine"] or ("indexed" if nodes > 1 else "job")
        engine = "trainjob" if engine == "kubeflow" else engine
        if engine == "indexed" and nodes == 1:
            engine = "job"  # one pod: the plain Job, no Service needed
        runtime = flag["runtime"] or TRAINER_RUNTIME
        return Layout(job, gpus, nodes, engine, runtime, **common)
    if job != "eval":
        return Layout(job, **common)
    shards = flag["shards"] or spec_int(spec, "SHARDS")
    parallelism = flag["parallelism"]
    if flag["merge"] and shards < 2:
        raise PermanentError("--merge needs a sharded eval: LORAFORGE_SHARDS > 1 or --shards N")
    if parallelism and shards < 2:
        raise PermanentError("--parallelism needs a sharded eval: LORAFORGE_SHARDS > 1")
    if parallelism and parallelism > shards:
        raise PermanentError(f"--parallelism {parallelism} is more than the {shards} shards")
    gpus = spec_int(spec, "TENSOR_PARALLEL")
    merge = bool(flag["merge"])
    return Layout(job, gpus, shards=shards, parallelism=parallelism, merge=merge, **common)


def spec_int(spec: Mapping[str, str], name: str, default: int = 1) -> int:
    """An integer setting read from the spec itself (the settings class validates it too)."""
    values = {k.upper(): v for k, v in spec.items()}
    text = values.get(PREFIX + name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise PermanentError(f"{PREFIX}{name}={text}: give a positive whole number")
    return int(text)


def scaled_spec(spec: Mapping[str, str], layout: Layout) -> dict[str, str]:
    """The spec with the flags' settings over it: --shards, and --merge's LORAFORGE_SHARD."""
    out = {k: v for k, v in spec.items() if k.upper() not in _overridden(layout)}
    if layout.job == "eval" and layout.shards > 1:
        out[PREFIX + "SHARDS"] = str(layout.shards)
    if layout.merge:
        out[PREFIX + "SHARD"] = "merge"
    return out


def _overridden(layout: Layout) -> set[str]:
    names = {PREFIX + "SHARDS"} if layout.job == "eval" and layout.shards > 1 else set()
    return names | ({PREFIX + "SHARD"} if layout.merge else set())


def pooled(gpu: Gpu, count: int) -> Gpu:
    """T GPUs as one for sizing vLLM's tensor parallelism: weights and KV cache split across
    them; each GPU's own CUDA context is counted once, so the estimate is slightly low."""
    if count == 1:
        return gpu
    return replace(gpu, name=f"{count}x{gpu.name}", vram_gib=gpu.vram_gib * count)


# ------------------------------------------------------------------------------- rendering


def render(
    job: str,
    spec: Mapping[str, str],
    layout: Layout,
    *,
    gpu: Gpu | None,
    plan: Plan | None,
    options: RenderOptions,
) -> dict[str, Any]:
    """The object(s) for `layout`: a Job, or a List (Service, NetworkPolicy, Job or custom
    resource) where several must be created together."""
    if layout.merge:  # no GPU: the merge reads the shards' predictions, not the model
        options = replace(options, model_bytes=0)
    base = render_job(
        job,
        scaled_spec(spec, layout),
        gpu=gpu,
        gpu_count=0 if gpu is None else layout.gpus,
        plan=plan,
        options=options,
    )
    if layout.merge:
        base["metadata"]["name"] += "-merge"
        return queued(base, layout)
    if job == "eval" and layout.shards > 1:
        return queued(sharded_eval(base, layout, options), layout)
    if job != "train" or (layout.engine == "job" and layout.gpus == 1):
        return queued(base, layout)
    if layout.gpus > 1:
        _scale_host_memory(base, layout.gpus, options.model_bytes)
    if layout.engine == "job":
        container_of(base)["command"] = torchrun(layout)
        return queued(base, layout)
    peers = network_policy(base)
    if layout.engine == "indexed":
        service, indexed = indexed_train(base, layout)
        return as_list([service, peers, queued(indexed, layout)])
    from loraforge.launcher import kubeflow

    if layout.engine == "trainjob":
        return as_list([peers, queued(kubeflow.trainjob(base, layout, options), layout)])
    return as_list([peers, queued(kubeflow.pytorchjob(base, layout), layout)])


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}


def items(rendered: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The objects of a render: a List's items, or the one object."""
    if rendered.get("kind") == "List":
        return list(rendered["items"])
    return [dict(rendered)]


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container_of(obj: dict[str, Any]) -> dict[str, Any]:
    return pod_of(obj)["containers"][0]  # type: ignore[no-any-return]


def shutdown_timeout(job: str = "train") -> int:
    return GRACE_SECONDS[job] - SHUTDOWN_MARGIN


def torchrun(layout: Layout, *rendezvous: str) -> list[str]:
    """`tini -- loraforge-torchrun ... -m loraforge.train` (tini stays PID 1)."""
    procs = [f"--nproc-per-node={layout.gpus}"] if layout.engine in ("job", "indexed") else []
    return [
        "/usr/bin/tini",
        "--",
        "loraforge-torchrun",
        *rendezvous,
        *procs,
        f"--shutdown-timeout={shutdown_timeout()}",
        "-m",
        "loraforge.train",
    ]


def _scale_host_memory(job: dict[str, Any], processes: int, model_bytes: int) -> None:
    """N training processes are N Python/torch/CUDA runtimes, each loading the model: host
    memory for each, plus /dev/shm (charged to the pod) sized for N by `render_job`."""
    gib = processes * host_memory_gib(model_bytes, 1) + shm_gib(processes)
    resources = container_of(job)["resources"]
    resources["requests"]["memory"] = resources["limits"]["memory"] = f"{gib}Gi"


def _index_env() -> dict[str, Any]:
    """JOB_COMPLETION_INDEX from the downward API: declared, so `$(JOB_COMPLETION_INDEX)` in the
    command expands whatever order the Job controller adds its own copy in."""
    path = f"metadata.annotations['{INDEX_ANNOTATION}']"
    return {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": path}}}


def dns_1035(name: str, what: str) -> str:
    """Services and the Kubeflow kinds take RFC 1035 names: a letter first."""
    if not RFC1035.fullmatch(name):
        raise PermanentError(
            f"{what} name {name} must start with a letter (RFC 1035): set LORAFORGE_RUN_ID to a "
            "run id that starts with a letter"
        )
    return name


# --- multi-node train: Indexed Job + headless Service -------------------------------------


def indexed_train(base: dict[str, Any], layout: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
    """M pods of one Indexed Job; pod k runs node rank k, pod 0 (`<job>-0.<service>`) hosts
    torchrun's static rendezvous."""
    job = copy.deepcopy(base)
    name = dns_1035(job["metadata"]["name"], "the Service")
    spec = job["spec"]
    ordered = {k: v for k, v in spec.items() if k != "template"}
    ordered |= {"completionMode": "Indexed", "completions": layout.nodes}
    ordered |= {"parallelism": layout.nodes, "template": spec["template"]}
    job["spec"] = ordered
    pod_of(job)["subdomain"] = name
    container = container_of(job)
    container["env"].append(_index_env())
    container["command"] = torchrun(
        layout,
        f"--nnodes={layout.nodes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={name}-0.{name}",
        f"--master-port={RDZV_PORT}",
    )
    container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    return headless_service(job), job


def headless_service(job: dict[str, Any]) -> dict[str, Any]:
    """DNS names for the Job's pods (`<pod hostname>.<service>`), ready or not: the rendezvous
    starts before any pod would pass a readiness probe."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(meta["labels"]),
        },
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: meta["name"]},
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RDZV_PORT,
                    "targetPort": RDZV_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def network_policy(job: dict[str, Any]) -> dict[str, Any]:
    """The run's pods may reach each other on any TCP port: torchrun's store on 29500 and NCCL's
    sockets on ephemeral ports. NetworkPolicies add up: k8s/base's still bounds the rest."""
    meta = job["metadata"]
    labels = meta["labels"]
    peers = {
        "podSelector": {
            "matchLabels": {
                key: labels[key]
                for key in ("app.kubernetes.io/instance", "app.kubernetes.io/component")
            }
        }
    }
    selector = dict(peers["podSelector"])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{meta['name']}-peers",
            "namespace": meta["namespace"],
            "labels": dict(labels),
        },
        "spec": {
            "podSelector": selector,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [peers], "ports": [{"protocol": "TCP"}]}],
            "egress": [{"to": [peers], "ports": [{"protocol": "TCP"}]}],
        },
    }


# --- sharded eval ---------------------------------------------------------------------------


def sharded_eval(base: dict[str, Any], layout: Layout, options: RenderOptions) -> dict[str, Any]:
    """N shards of one Indexed Job; the eval job reads its shard from JOB_COMPLETION_INDEX and
    the last shard to finish merges. Each shard has its own retries (backoffLimitPerIndex, GA in
    1.33, beta and on by default in 1.31-1.32): a flaky shard cannot spend the others'. Exit 2
    still fails the whole Job: a bad configuration is the same in every shard."""
    job = copy.deepcopy(base)
    spec = job["spec"]
    per_index = options.backoff_limit
    ordered = {k: v for k, v in spec.items() if k not in ("template", "backoffLimit")}
    ordered = {"backoffLimit": per_index * layout.shards, "backoffLimitPerIndex": per_index} | (
        ordered
    )
    ordered |= {"completionMode": "Indexed", "completions": layout.shards}
    ordered |= {"parallelism": layout.parallelism or layout.shards, "template": spec["template"]}
    job["spec"] = ordered
    container_of(job)["env"].append(_index_env())
    return job


# --- queues ---------------------------------------------------------------------------------


def queued(obj: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """Kueue's labels, created suspended (Kueue unsuspends on admission), and the pods'
    PriorityClass. Kueue takes a WorkloadPriorityClass label first, else the pods' class. The
    labels go on the object only (its pod template shares the dict: copied first)."""
    labels = obj["metadata"]["labels"] = dict(obj["metadata"]["labels"])
    if layout.queue:
        labels[QUEUE_LABEL] = layout.queue
    if layout.workload_priority_class:
        labels[WORKLOAD_PRIORITY_LABEL] = layout.workload_priority_class
    kind = obj["kind"]
    if layout.queue:
        if kind == "PyTorchJob":
            obj["spec"]["runPolicy"]["suspend"] = True
        else:
            obj["spec"] = {"suspend": True, **obj["spec"]}
    if layout.priority_class and kind == "Job":
        pod_of(obj)["priorityClassName"] = layout.priority_class
    if layout.priority_class and kind == "PyTorchJob":
        for replica in obj["spec"]["pytorchReplicaSpecs"].values():
            replica["template"]["spec"]["priorityClassName"] = layout.priority_class
    return obj
