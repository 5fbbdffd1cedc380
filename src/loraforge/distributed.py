"""Data-parallel training across the processes `torchrun` starts (`loraforge-torchrun`).

The world comes from torchrun's RANK / LOCAL_RANK / WORLD_SIZE. An optimizer step's
LORAFORGE_GRAD_ACCUM micro-batches are the same as in one process (a pure function of seed and
step); process r takes micro-batches r, r+W, r+2W, ... PyTorch's DistributedDataParallel averages
the gradients over the W processes, so each scales its loss by W: every process ends the step
with the gradient of the whole step, as one process would. The effective batch, the schedule and
the result (to summation order) do not depend on W, and a checkpoint made at one world size
resumes at another. Rank 0 logs and publishes; the others wait for it.

`loraforge-torchrun` is `torchrun` with loraforge's exit codes: the root-cause worker's code
(2 bad input, 75 transient, 143 SIGTERM) instead of torchrun's 1, so the Job's podFailurePolicy
still tells a bad configuration from a preemption.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from loraforge.errors import PermanentError

log = logging.getLogger("loraforge.distributed")
# Long enough for rank 0 to publish a checkpoint or the adapter while the others wait.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """torchrun's variables; one process when they are absent."""
        try:
            return cls(
                rank=int(os.environ.get("RANK", "0")),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                size=int(os.environ.get("WORLD_SIZE", "1")),
            )
        except ValueError as exc:
            raise PermanentError(f"RANK/LOCAL_RANK/WORLD_SIZE are not integers ({exc})") from None


def start(world: World, device: torch.device, grad_accum: int) -> torch.device:
    """Join the process group; returns this process's device (cuda:LOCAL_RANK on GPUs)."""
    if grad_accum % world.size:
        raise PermanentError(
            f"LORAFORGE_GRAD_ACCUM={grad_accum} is not a multiple of the {world.size} training "
            f"processes (WORLD_SIZE): set it to a multiple of {world.size}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    if not world.main:  # one voice in the pod's log; warnings and errors still show
        logging.getLogger("loraforge").setLevel(logging.WARNING)
    log.info(f"process group: {world.size} processes, backend {backend}")
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (fills the download cache), then the others."""
    if world.distributed and not world.main:
        dist.barrier()
    yield
    if world.distributed and world.main:
        dist.barrier()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sum_values(world: World, values: Sequence[float]) -> list[float]:
    """Element-wise sum over the processes (float64, so token counts stay exact)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_true(world: World, flag: bool) -> bool:
    return sum_values(world, [float(flag)])[0] > 0


def from_main(world: World, value: Any) -> Any:
    """Rank 0's `value` on every process."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters.

    The adapter's initial values are broadcast from rank 0; the frozen base is not (each process
    loaded the same weights), which would cost a full copy of the model over the network."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        dist.broadcast(param.data, src=0)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, init_sync=False, broadcast_buffers=False
    )


# --- FSDP ---------------------------------------------------------------------------------------


def shard(model: nn.Module) -> None:
    """FSDP2 in place: each decoder layer (the classes transformers never splits) is a unit,
    then the root. Parameters become DTensor shards on this process's device."""
    from torch.distributed.fsdp import fully_shard

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if get_base is not None else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise PermanentError(
            f"LORAFORGE_PARALLEL=fsdp: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by; use LORAFORGE_PARALLEL=ddp"
        )
    kinds = ", ".join(sorted({type(m).__name__ for m in units}))
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    log.info(f"FSDP: {len(units)} {kinds} units and the root, sharded over {dist.get_world_size()}")


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole adapter and optimizer state on rank 0 (empty elsewhere); every process calls
    it. The optimizer's state comes back keyed by parameter index, as `optimizer.state_dict()`
    keys it in one process, so a checkpoint does not depend on how it was made."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return dict(get_model_state_dict(model, options=_options())), {}
    weights, raw = get_state_dict(model, optimizer, options=_options())
    optim: dict[str, Any] = dict(raw)
    if not optim:
        return weights, {}
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: slots for name, slots in optim["state"].items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in optim["param_groups"]]
    return dict(weights), {"state": state, "param_groups": groups}


def scatter_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]
) -> None:
    """Load a one-process `optimizer.state_dict()` (index-keyed) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = {names[int(i)]: slots for i, slots in full["state"].items()}
    groups = [dict(g, params=[names[int(i)] for i in g["params"]]) for g in full["param_groups"]]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=_options()
    )


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout's RNG for a step of a data-parallel run: a function of (seed, step, rank), so a
    resumed run draws what the uninterrupted one did (one process keeps its saved stream)."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --- loraforge-torchrun ------------------------------------------------------------------------


def exit_code(exc: BaseException) -> int:
    """Exit code of a failed torchrun: the first failing worker's, signals as 128+N."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(exc, SignalException):
        return 128 + int(exc.sigval)
    if isinstance(exc, ChildFailedError):
        _, failure = exc.get_first_failure()
        code = int(failure.exitcode)
        return 128 - code if code < 0 else code
    return 1


def torchrun_main(argv: list[str] | None = None) -> None:
    """`loraforge-torchrun ARGS`: `torchrun ARGS` with the failing worker's exit code."""
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    try:
        run(args)  # type: ignore[no-untyped-call]
    except SystemExit:
        raise
    except BaseException as exc:  # every failure becomes an exit code
        code = exit_code(exc)
        if code == 128 + signal.SIGTERM:
            log.error("SIGTERM: workers stopped (checkpoint published by rank 0 when training)")
        else:
            print(f"loraforge-torchrun: workers failed, exit {code}", file=sys.stderr)
        sys.exit(code)
