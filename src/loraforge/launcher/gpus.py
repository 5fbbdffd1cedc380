"""The GPU catalog and what a node's GPU Feature Discovery labels say about its GPU (no torch).

VRAM is what the driver reports (`nvidia-smi --query-gpu=memory.total`, also GFD's
`nvidia.com/gpu.memory` label in MiB), not the marketing figure: a "16 GB" T4 reports 15360 MiB.
MIG slices are sized from the `nvidia.com/gpu.memory` label of the node, never from the
profile's name (design.md, Sizing); the catalog's MIG figures are those of an A100-80GB and only
serve `--gpu mig-<profile>` without a cluster.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from loraforge.errors import PermanentError

GiB = 2**30
HEADROOM = 0.90  # share of a GPU's memory the estimated peak may take (the rest: estimate error)

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB
COUNT_LABEL = "nvidia.com/gpu.count"
STRATEGY_LABEL = "nvidia.com/mig.strategy"  # none | single | mixed
COMPUTE_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
GPU_RESOURCE = "nvidia.com/gpu"
_MIG_SUFFIX = re.compile(r"-MIG-(\d+g\.\d+gb)$", re.IGNORECASE)
_MIXED_COUNT = re.compile(r"^nvidia\.com/mig-(\d+g\.\d+gb)\.count$")


@dataclass(frozen=True)
class Gpu:
    name: str
    vram_gib: float
    bf16: bool
    products: tuple[str, ...]  # GFD `nvidia.com/gpu.product` values that identify it
    mig: bool = False

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * GiB)


def _mib(mib: int) -> float:
    return round(mib / 1024, 2)


_A100_80 = ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe")
_H100_80 = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe")


def _mig(profile: str, mib: int) -> Gpu:
    products = tuple(f"{p}-MIG-{profile}" for p in _A100_80 + _H100_80)
    return Gpu(f"mig-{profile}", _mib(mib), True, products, mig=True)


# Memory in MiB as the driver reports it. T4 (Turing) has no bf16; every later GPU has.
CATALOG: tuple[Gpu, ...] = (
    Gpu("T4", _mib(15360), False, ("Tesla-T4",)),
    Gpu("L4", _mib(23034), True, ("NVIDIA-L4",)),
    Gpu("A10G", _mib(23028), True, ("NVIDIA-A10G",)),
    Gpu("L40S", _mib(46068), True, ("NVIDIA-L40S",)),
    Gpu("A100-40GB", _mib(40960), True, ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB")),
    Gpu("A100-80GB", _mib(81920), True, _A100_80),
    Gpu("H100-80GB", _mib(81559), True, _H100_80),
    Gpu("H200", _mib(143771), True, ("NVIDIA-H200",)),
    Gpu("B200", _mib(183359), True, ("NVIDIA-B200",)),
    _mig("1g.10gb", 9728),
    _mig("1g.20gb", 19968),
    _mig("2g.20gb", 19968),
    _mig("3g.40gb", 40192),
    _mig("4g.40gb", 40192),
    _mig("7g.80gb", 80896),
)


def names() -> list[str]:
    return [gpu.name for gpu in CATALOG]


def get(name: str) -> Gpu:
    """A catalog GPU by name (`T4`, `a100-80gb`, `mig-1g.10gb`) or GFD product, any case."""
    wanted = name.strip().lower()
    for gpu in CATALOG:
        if wanted == gpu.name.lower() or wanted in (p.lower() for p in gpu.products):
            return gpu
    raise PermanentError(f"unknown GPU {name!r}: use one of {', '.join(names())}")


@dataclass(frozen=True)
class NodeGpu:
    """The GPUs one node offers: which, how many, and how a Job asks for them."""

    node: str
    gpu: Gpu
    count: int
    product: str  # the GFD product label value, for the Job's node selector
    resource: str = GPU_RESOURCE  # `nvidia.com/mig-<profile>` under the mixed MIG strategy


def _by_product(product: str) -> Gpu | None:
    bare = product.removesuffix("-SHARED").lower()  # time-slicing renames the product
    return next((g for g in CATALOG if bare in (p.lower() for p in g.products)), None)


def _gpu_for(product: str, memory_mib: str | None, compute_major: str | None) -> Gpu | None:
    """The catalog GPU, with the node's own memory label when it has one; else an ad-hoc GPU."""
    known = _by_product(product)
    mig = _MIG_SUFFIX.search(product.removesuffix("-SHARED"))
    if known is None and mig:
        known = next((g for g in CATALOG if g.name == f"mig-{mig.group(1).lower()}"), None)
    if memory_mib is None or not memory_mib.isdigit():
        return known
    vram = _mib(int(memory_mib))
    if known is not None:
        return dataclasses.replace(known, vram_gib=vram)
    bf16 = compute_major is not None and compute_major.isdigit() and int(compute_major) >= 8
    name = f"mig-{mig.group(1).lower()}" if mig else product.removesuffix("-SHARED").lower()
    return Gpu(name, vram, bf16, (product,), mig=mig is not None)


def _count(value: str | None) -> int:
    return int(value) if value is not None and value.isdigit() else 0


def node_gpus(node: str, labels: Mapping[str, str]) -> list[NodeGpu]:
    """Every kind of GPU the node offers (several only under the mixed MIG strategy)."""
    product = labels.get(PRODUCT_LABEL)
    if product is None:
        return []
    major = labels.get(COMPUTE_MAJOR_LABEL)
    found = []
    if labels.get(STRATEGY_LABEL) == "mixed":
        for key in sorted(labels):
            match = _MIXED_COUNT.match(key)
            if not match or _count(labels[key]) == 0:
                continue
            profile = match.group(1)
            mig_product = labels.get(
                f"nvidia.com/mig-{profile}.product", f"{product}-MIG-{profile}"
            )
            gpu = _gpu_for(mig_product, labels.get(f"nvidia.com/mig-{profile}.memory"), major)
            if gpu is not None:
                resource = f"nvidia.com/mig-{profile}"
                found.append(NodeGpu(node, gpu, _count(labels[key]), mig_product, resource))
    if not found:
        gpu = _gpu_for(product, labels.get(MEMORY_LABEL), major)
        if gpu is not None:
            count = _count(labels[COUNT_LABEL]) if COUNT_LABEL in labels else 1
            found.append(NodeGpu(node, gpu, count, product))
    return found


def from_node_labels(node: str, labels: Mapping[str, str]) -> NodeGpu | None:
    """The node's GPU from its GFD labels (the largest kind under mixed MIG); None without GFD
    labels or when the product is unknown and the node has no memory label to size it by."""
    offered = node_gpus(node, labels)
    return max(offered, key=lambda n: n.gpu.vram_gib) if offered else None


def fits(gpu: Gpu, need_bytes: float) -> bool:
    """Whether an estimated peak of `need_bytes` stays within HEADROOM of the GPU's memory."""
    return need_bytes <= HEADROOM * gpu.vram_bytes


def pick_node(nodes: list[NodeGpu], need_bytes: float) -> NodeGpu:
    """The node with the smallest GPU that fits an estimated peak of `need_bytes` (ties: name)."""
    usable = [n for n in nodes if n.count > 0 and fits(n.gpu, need_bytes)]
    if usable:
        return min(usable, key=lambda n: (n.gpu.vram_gib, n.node))
    seen = ", ".join(f"{n.node} ({n.gpu.name}, {n.gpu.vram_gib:g} GiB)" for n in nodes) or "none"
    raise PermanentError(
        f"no node's GPU holds an estimated peak of {need_bytes / GiB:.1f} GiB within "
        f"{HEADROOM:.0%} of its memory; GPU nodes: {seen}: use a smaller model, "
        "LORAFORGE_QUANTIZATION=nf4 or a smaller LORAFORGE_MAX_SEQ_LEN"
    )
