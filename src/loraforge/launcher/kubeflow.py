"""The Kubeflow forms of a multi-node training run (`loraforge render train --engine`).

`trainjob`: a Kubeflow Trainer v2 TrainJob (`trainer.kubeflow.org/v1alpha1`, Trainer v2.2+ with
the runtimePatches API) on a torch ClusterTrainingRuntime, `torch-distributed` by default.
`pytorchjob`: a Kubeflow Training Operator v1 PyTorchJob (`kubeflow.org/v1`). Both start from
the Job `render.render_job` builds, so the container, its env, resources, security context,
volumes and scheduling are the same; what each operator cannot express is said where it is
dropped (docs/scale.md, "Engines"). tests/schemas/ holds the CRD schemas they are checked against.
"""

from __future__ import annotations

import copy
from typing import Any

from loraforge.errors import PermanentError
from loraforge.launcher.render import RenderOptions
from loraforge.launcher.scale import Layout, container_of, dns_1035, pod_of, torchrun

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINER_CONTAINER = "node"  # the trainer container (and replicated job) of the torch runtimes
PATCH_MANAGER = "loraforge.dev/render"  # our entry of spec.runtimePatches
PYTORCHJOB_API = "kubeflow.org/v1"
PYTORCHJOB_CONTAINER = "pytorch"  # the operator refuses a PyTorchJob without it
PYTORCHJOB_PORT = 23456  # the operator's default `pytorchjob-port`


def trainjob(base: dict[str, Any], layout: Layout, options: RenderOptions) -> dict[str, Any]:
    """A TrainJob on a torch ClusterTrainingRuntime: the Trainer sets torchrun's PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK and PET_MASTER_ADDR/PORT. Credentials come by
    secretKeyRef (the Trainer API has no envFrom); the pod's security context, volumes and
    scheduling come through a runtime patch; what a patch cannot set (the grace period, the
    service account token, the failure policy) is the runtime's (docs/scale.md)."""
    if layout.priority_class:
        raise PermanentError(
            "--priority-class: a TrainJob's runtime patch cannot set priorityClassName; use "
            "--workload-priority-class (Kueue) or set it in the ClusterTrainingRuntime"
        )
    meta = copy.deepcopy(base["metadata"])
    dns_1035(meta["name"], "the TrainJob")
    pod, container = pod_of(base), container_of(base)
    trainer = {
        "image": container["image"],
        "command": torchrun(layout),
        "env": container["env"] + _secret_env(options),
        "numNodes": layout.nodes,
        "numProcPerNode": layout.gpus,
        "resourcesPerNode": container["resources"],
    }
    keys = ("serviceAccountName", "securityContext", "nodeSelector", "affinity", "tolerations")
    pod_patch: dict[str, Any] = {key: pod[key] for key in keys if key in pod}
    pod_patch["volumes"] = pod["volumes"]
    pod_patch["containers"] = [
        {
            "name": TRAINER_CONTAINER,
            "securityContext": container["securityContext"],
            "volumeMounts": container["volumeMounts"],
        }
    ]
    replicated = {
        "name": TRAINER_CONTAINER,
        "template": {
            "spec": {
                "template": {
                    "metadata": {"labels": dict(base["spec"]["template"]["metadata"]["labels"])},
                    "spec": pod_patch,
                }
            }
        },
    }
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": meta,
        "spec": {
            "runtimeRef": {
                "name": layout.runtime,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "activeDeadlineSeconds": base["spec"]["activeDeadlineSeconds"],
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
                }
            ],
        },
    }


def _secret_env(options: RenderOptions) -> list[dict[str, Any]]:
    """The Secrets' keys one by one (what `envFrom` gives a Job's container)."""
    keys = []
    if options.s3_secret:
        keys += [(options.s3_secret, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if options.hf_secret:
        keys.append((options.hf_secret, "HF_TOKEN"))
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for secret, key in keys
    ]


# --- multi-node train: Kubeflow Training Operator v1 PyTorchJob ---------------------------


def pytorchjob(base: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """Master + M-1 Workers; the operator sets torchrun's PET_* variables and MASTER_ADDR.

    restartPolicy ExitCode is the operator's nearest to the exit-code table: 1-127 are
    permanent (2 fails the job at once, but so does 75), 128-255 retried (143 after SIGTERM).
    """
    meta = copy.deepcopy(base["metadata"])
    dns_1035(meta["name"], "the PyTorchJob")
    template = copy.deepcopy(base["spec"]["template"])
    container = template["spec"]["containers"][0]
    container["name"] = PYTORCHJOB_CONTAINER
    container["command"] = torchrun(layout)
    container["ports"] = [
        {"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}
    ]

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "ExitCode", "template": copy.deepcopy(template)}

    replicas = {"Master": replica(1)}
    if layout.nodes > 1:
        replicas["Worker"] = replica(layout.nodes - 1)
    spec = base["spec"]
    return {
        "apiVersion": PYTORCHJOB_API,
        "kind": "PyTorchJob",
        "metadata": meta,
        "spec": {
            "nprocPerNode": str(layout.gpus),
            "runPolicy": {
                "backoffLimit": spec["backoffLimit"],
                "activeDeadlineSeconds": spec["activeDeadlineSeconds"],
                "ttlSecondsAfterFinished": spec["ttlSecondsAfterFinished"],
                "cleanPodPolicy": "Running",
            },
            "pytorchReplicaSpecs": replicas,
        },
    }
