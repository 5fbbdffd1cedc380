"""Where a Job runs: the GPU `--gpu NAME|none|auto` names and the sizing plan for it (no torch).

`resolve_gpu` takes a catalog name (or a GFD product name, which then selects exactly that
product), `none` for a CPU Job, or `auto`: the GPU Feature Discovery labels of the cluster's
nodes, planning for each kind of GPU they offer, smallest first, and taking the first the run
fits. `count` GPUs of a kind are planned as one pool (vLLM tensor parallelism, `scale.pooled`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loraforge.errors import LoraforgeError, PermanentError
from loraforge.launcher.render import HOSTNAME_LABEL, MEMORY_LABEL, PRODUCT_LABEL, RenderOptions

if TYPE_CHECKING:
    from loraforge.launcher.gpus import Gpu, NodeGpu
    from loraforge.settings import JobSettings
    from loraforge.sizing import Plan


def weight_bytes(config: Mapping[str, Any]) -> int:
    """Bytes of the base weights at 16 bits, from `config.json` (no torch)."""
    from loraforge.sizing import ModelShape

    return 2 * ModelShape.from_config(config).params


def plan_for(
    job: str, config: Mapping[str, Any], gpu: Gpu, settings: JobSettings, count: int = 1
) -> Plan:
    """The sizing plan of `job` on `gpu` (`count` of them pooled for tensor parallelism;
    PermanentError when it cannot fit)."""
    from loraforge import sizing
    from loraforge.launcher.scale import pooled
    from loraforge.settings import EditSettings, EvalSettings, TrainSettings

    gpu = pooled(gpu, count)

    if isinstance(settings, TrainSettings):
        return sizing.plan_train(config, gpu, settings)
    if isinstance(settings, EditSettings):
        return sizing.plan_edit(config, gpu, settings)
    if isinstance(settings, EvalSettings):
        return sizing.plan_eval(config, gpu, settings)
    raise PermanentError(f"no sizing for the {job} job")


def resolve_gpu(
    job: str,
    args: argparse.Namespace,
    config: Mapping[str, Any],
    settings: JobSettings,
    options: RenderOptions,
    count: int = 1,
) -> tuple[Gpu | None, Plan | None, RenderOptions]:
    """`--gpu NAME|none|auto` -> the GPU, its sizing plan (for `count` GPUs of it pooled) and
    the node-specific options."""
    from loraforge.launcher import gpus

    if args.gpu == "none":
        return None, None, options
    if args.gpu != "auto":
        gpu = gpus.get(args.gpu)
        # a GFD product name (not a catalog name) selects exactly that product
        product = next((p for p in gpu.products if p.lower() == args.gpu.lower()), None)
        options = replace(options, gpu_product=product)
        return gpu, plan_for(job, config, gpu, settings, count), options
    labels = _cluster_gpu_labels(args)
    offered = [
        ng for name, node_labels in labels.items() for ng in gpus.node_gpus(name, node_labels)
    ]
    if not offered:
        where = f"node {args.node} carries" if args.node else "no node of the cluster carries"
        raise PermanentError(
            f"--gpu auto: {where} NVIDIA GPU Feature Discovery labels ({PRODUCT_LABEL}): "
            "install GFD (NVIDIA GPU Operator) or name a GPU with --gpu NAME"
        )
    chosen, plan = pick(job, config, settings, offered, count)
    node_labels = labels[chosen.node]
    memory = node_labels.get(MEMORY_LABEL, "")
    options = replace(
        options,
        node=node_labels.get(HOSTNAME_LABEL, chosen.node) if args.node else None,
        gpu_product=chosen.product,
        gpu_memory_mib=int(memory) if memory.isdigit() else None,
        gpu_resource=chosen.resource,
    )
    return chosen.gpu, plan, options


def pick(
    job: str,
    config: Mapping[str, Any],
    settings: JobSettings,
    offered: list[NodeGpu],
    count: int = 1,
) -> tuple[NodeGpu, Plan]:
    """The smallest GPU offered that the run fits once sized for it, and the plan for it.

    Sizing depends on the GPU (quantization, micro-batch, checkpointing), so each kind of GPU
    is planned for, smallest first; `gpus.pick_node` then picks among the nodes offering it.
    """
    from loraforge.launcher import gpus

    problems = []
    for gpu in sorted({ng.gpu for ng in offered}, key=lambda g: (g.vram_gib, g.name)):
        try:
            plan = plan_for(job, config, gpu, settings, count)
        except PermanentError as exc:
            problems.append(f"{gpu.name}: {exc}")
            continue
        return gpus.pick_node([ng for ng in offered if ng.gpu == gpu], plan.peak_bytes), plan
    raise PermanentError("--gpu auto: the run fits no GPU of the cluster: " + "; ".join(problems))


def _cluster_gpu_labels(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Node name -> labels, for every node or the one named by --node."""
    from loraforge.launcher.client import Cluster

    try:
        with Cluster.connect(args.namespace, args.kubeconfig, args.context) as cluster:
            nodes = dict(cluster.list_nodes())
    except LoraforgeError as exc:
        raise type(exc)(
            f"--gpu auto needs the cluster's node labels: {exc}; or name a GPU with --gpu NAME "
            "(`loraforge gpus` lists them) or --gpu none"
        ) from exc
    if args.node:
        if args.node not in nodes:
            raise PermanentError(f"--node {args.node}: no such node in the cluster")
        return {args.node: nodes[args.node]}
    return nodes
