"""Jobs for the fault suite: forked processes, each with at most one injected fault.

`Jobs` runs a job's console-script function (`loraforge.train.main`, ...) in a child of a
multiprocessing fork server that has torch, transformers, peft and loraforge imported already,
so a job starts in ~0.5 s instead of ~5 s, with its own environment, stdout and stderr files.
Exit codes, signal handling and logging are the entrypoint's own; a SIGKILLed child reports -9.

A fault is `<action>@<point>[:<a>[:<b>]]`:

- action `kill`: the job SIGKILLs itself there (what the OOM killer or a lost node does);
  `term`: it SIGTERMs itself and carries on (what the kubelet does on preemption);
  `wait`: it blocks until a second job reaches the same point (`barrier`), to line up races.
- point `forward:c[:j]`: the j-th loss computation (default 1) after c completed steps;
  `ckpt-save:c`: writing checkpoint c's files, before the optimizer state;
  `ckpt-upload:c:k`: publishing checkpoint c, before its file number k+1 goes to the store;
  `ckpt-manifest:c`: every file of checkpoint c stored, before its manifest;
  `ckpt-done:c`: checkpoint c published, before training goes on;
  `final-upload:k`, `final-manifest`, `final-done`: the same for the job's output artifact;
  `load`: the base model loaded; `calibrate`: the edit job starts its sensitivity pass;
  `progress:k`: right after the k-th progress line (train: a step; eval: a generation batch).

The injector wraps library functions in the child only; nothing in `src/` knows about it.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loraforge import store

# Jobs run with one intra-op thread (LFTEST_TORCH_THREADS): with two, PyTorch's CPU kernels are
# not bit-reproducible from one process to the next (measured: 2 of 50 uninterrupted BiDoRA runs
# ended with other weights, first at `aten.cos` of the rotary embedding on identical input; 0 of
# 50 with one thread), and the suite's claim is about the resume logic, not about those kernels.
THREADS = 1
ENTRYPOINTS = {
    "train": "loraforge.train",
    "edit": "loraforge.edit",
    "eval": "loraforge.eval",
    "cli": "loraforge.launcher.cli",
}
_CHECKPOINT = re.compile(r"/step-(\d+)$")

# --- the training run the suite faults: short, checkpointed, with dropout ----------------------

STEPS, INTERVAL = 8, 2
TRAIN = {
    "LORAFORGE_MAX_STEPS": str(STEPS),
    "LORAFORGE_CHECKPOINT_INTERVAL": str(INTERVAL),
    "LORAFORGE_CHECKPOINT_SECONDS": "0",
    "LORAFORGE_EVAL_INTERVAL": "0",
    "LORAFORGE_MICRO_BATCH_SIZE": "4",
    "LORAFORGE_GRAD_ACCUM": "2",  # a kill can fall between the micro-batches of one step
    "LORAFORGE_LEARNING_RATE": "3e-3",
    "LORAFORGE_DROPOUT": "0.1",  # dropout draws from the RNG: a resume must restore it
    "LORAFORGE_MAX_SEQ_LEN": "256",
    "LORAFORGE_DEVICE": "cpu",
}
METHODS = {
    "lora": {"LORAFORGE_METHOD": "lora"},
    "dora": {"LORAFORGE_METHOD": "dora"},
    # three direction steps per round: checkpoints fall mid-round as well as between rounds
    "bidora": {"LORAFORGE_METHOD": "bidora", "LORAFORGE_BIDORA_LOWER_STEPS": "3"},
}


def train_env(kit: Any, root: str, method: str, run_id: str) -> dict[str, str]:
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_DATA": str(kit.train),
        "LORAFORGE_VAL_DATA": str(kit.val),
        "LORAFORGE_STORE": root,
        "LORAFORGE_RUN_ID": run_id,
        **TRAIN,
        **METHODS[method],
    }


def tensors(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.fetch(uri).path / "adapter_model.safetensors"))


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


# --- the child side ------------------------------------------------------------------------------


class Injector:
    """Fires one fault at one point of a job, from wrappers around library functions."""

    def __init__(self, spec: str, barrier: str | None = None) -> None:
        self.action, _, rest = spec.partition("@")
        self.point, *args = rest.split(":")
        self.args = [int(a) for a in args]
        self.barrier = barrier
        self.fired = False
        self.done = 0  # completed steps, from the progress lines
        self.losses = 0  # loss computations since the last progress line
        self.progress_lines = 0
        self.saving: int | None = None  # checkpoint step being written
        self.publishing: int | None = None  # checkpoint step (or -1: the output) being published
        self.files = 0

    def arg(self, index: int, default: int = 0) -> int:
        return self.args[index] if len(self.args) > index else default

    def fire(self, point: str) -> None:
        if self.fired or point != self.point:
            return
        self.fired = True
        event = {"fault": self.action, "point": point, "args": self.args, "t": time.time()}
        sys.stderr.write(json.dumps(event) + "\n")
        sys.stderr.flush()
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # never reached: SIGKILL is not deferred
        elif self.action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.action == "wait":
            self._wait_for_peer()

    def _wait_for_peer(self, timeout: float = 120.0) -> None:
        assert self.barrier, "wait needs a barrier directory"
        Path(self.barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + timeout
        while len(list(Path(self.barrier).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    # hooks, called by the wrappers

    def on_progress(self, step: int) -> None:
        self.done, self.losses = step, 0
        self.progress_lines += 1
        if self.progress_lines == self.arg(0, -1):
            self.fire("progress")

    def on_loss(self) -> None:
        self.losses += 1
        if self.done == self.arg(0, -1) and self.losses == self.arg(1, 1):
            self.fire("forward")

    def on_file(self) -> None:
        if self.publishing is not None:
            if self.publishing >= 0 and self.publishing == self.arg(0, -1):
                if self.files == self.arg(1):
                    self.fire("ckpt-upload")
            elif self.publishing < 0 and self.files == self.arg(0):
                self.fire("final-upload")
            self.files += 1

    def on_manifest(self) -> None:
        if self.publishing is not None and self.publishing >= 0:
            if self.publishing == self.arg(0, -1):
                self.fire("ckpt-manifest")
        elif self.publishing is not None:
            self.fire("final-manifest")

    def install(self) -> None:
        import importlib

        from loraforge import checkpoint, edit, logs, packing, s3, store, train

        injector = self

        def progress_init(original: Callable[..., None], obj: Any, *a: Any, **kw: Any) -> None:
            kw["every_s"] = 0.0  # a progress line per step: the test reads the step count
            original(obj, *a, **kw)
            injector.done = obj._start_step

        _around(logs.Progress, "__init__", progress_init)
        _before(logs.Progress, "update", lambda obj, step, *a, **kw: self.on_progress(step))
        _before(packing, "token_loss_sum", lambda *a, **kw: self.on_loss())
        _around(checkpoint, "save", self._saving)
        _before(checkpoint, "save_file", lambda *a, **kw: self._fire_if_saving())
        _around(store, "publish", self._publishing)
        _before(store, "_copy_synced", lambda *a, **kw: self.on_file())
        _before(store, "_create_exclusive", lambda *a, **kw: self.on_manifest())
        _around(s3.S3Backend, "__init__", self._s3_backend)
        eval_job = importlib.import_module("loraforge.eval")
        for module in (train, edit, eval_job):
            _after(module, "load_base_model", lambda *a, **kw: self.fire("load"))
        _before(edit, "sensitivities", lambda *a, **kw: self.fire("calibrate"))

    def _saving(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.saving = args[3].step  # save(directory, model, optimizer, state)
        try:
            return original(*args, **kwargs)
        finally:
            self.saving = None

    def _fire_if_saving(self) -> None:
        if self.saving is not None and self.saving == self.arg(0, -1):
            self.fire("ckpt-save")

    def _publishing(self, original: Callable[..., Any], src: Any, uri: str, **kw: Any) -> Any:
        match = _CHECKPOINT.search(uri)
        self.publishing, self.files = (int(match.group(1)) if match else -1), 0
        try:
            result = original(src, uri, **kw)
        finally:
            step, self.publishing = self.publishing, None
        if step >= 0 and step == self.arg(0, -1):
            self.fire("ckpt-done")
        elif step < 0:
            self.fire("final-done")
        return result

    def _s3_backend(self, original: Callable[..., None], backend: Any, *a: Any, **kw: Any) -> None:
        original(backend, *a, **kw)
        upload, put = backend.client.upload_file, backend.client.put_object

        def upload_file(*args: Any, **kwargs: Any) -> Any:
            self.on_file()
            return upload(*args, **kwargs)

        def put_object(*args: Any, **kwargs: Any) -> Any:
            if str(kwargs.get("Key", "")).endswith("loraforge.json"):
                self.on_manifest()
            return put(*args, **kwargs)

        backend.client.upload_file, backend.client.put_object = upload_file, put_object


def _around(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(owner, name, wrapped)


def _before(owner: Any, name: str, hook: Callable[..., None]) -> None:
    def wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hook(*args, **kwargs)
        return original(*args, **kwargs)

    _around(owner, name, wrapper)


def _after(owner: Any, name: str, hook: Callable[..., None]) -> None:
    def wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        hook(*args, **kwargs)
        return result

    _around(owner, name, wrapper)


def child(
    job: str, env: dict[str, str], fault: str | None, barrier: str | None, out: str, err: str
) -> None:
    """The forked job: its environment, stdout/stderr files, the fault, then the entrypoint."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    if env.get("LFTEST_TORCH_THREADS"):  # see THREADS
        torch.set_num_threads(int(env["LFTEST_TORCH_THREADS"]))
    if fault:
        Injector(fault, barrier).install()
    import importlib

    main = importlib.import_module(ENTRYPOINTS[job]).main
    main(*([env["LFTEST_ARGV"].split("\x1f")] if job == "cli" else []))


# --- the test side -------------------------------------------------------------------------------


@dataclass
class Finished:
    code: int  # the exit code; -9 when SIGKILLed
    out: str
    err: str
    started: float  # time.time()
    ended: float

    @property
    def log(self) -> list[dict[str, Any]]:
        """The JSON lines of stderr (warnings of libraries are plain text and skipped)."""
        lines = []
        for line in self.err.splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == name]

    @property
    def fault(self) -> dict[str, Any] | None:
        return next((e for e in self.log if "fault" in e), None)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("level") == "error"]

    @property
    def last_step(self) -> int:
        """The last completed step that a progress line reported (0: none)."""
        steps = [int(e["step"]) for e in self.events("progress")]
        return max(steps, default=0)

    @property
    def resumed_at(self) -> int:
        resumed = self.events("resume")
        return int(resumed[0]["step"]) if resumed else 0


class Running:
    def __init__(self, process: Any, out: Path, err: Path) -> None:
        self.process, self.out_path, self.err_path = process, out, err
        self.started = time.time()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def err_text(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def progress_step(self) -> int:
        steps = [
            int(m.group(1))
            for m in re.finditer(r'"event": "progress", "step": (\d+)', self.err_text())
        ]
        return max(steps, default=-1)

    def wait(self, timeout: float = 300.0) -> Finished:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(10)
            raise AssertionError(f"job still running after {timeout}s:\n{self.err_text()[-3000:]}")
        return Finished(
            int(self.process.exitcode),
            self.out_path.read_text(errors="replace"),
            self.err_text(),
            self.started,
            time.time(),
        )


class Jobs:
    """Starts jobs as children of one fork server (preloaded once per test session)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["tests.faults_preload"])
        self.count = 0

    def start(
        self,
        job: str,
        env: dict[str, str],
        fault: str | None = None,
        barrier: Path | None = None,
        argv: list[str] | None = None,
    ) -> Running:
        self.count += 1
        out, err = (
            self.root / f"{self.count:04d}-{job}.out",
            self.root / f"{self.count:04d}-{job}.err",
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
        full = {**base, "LORAFORGE_LOG_FORMAT": "json", "LFTEST_TORCH_THREADS": str(THREADS), **env}
        if argv is not None:
            full["LFTEST_ARGV"] = "\x1f".join(argv)
        args = (job, full, fault, str(barrier) if barrier else None, str(out), str(err))
        process = self.context.Process(target=child, args=args, daemon=True)
        process.start()
        return Running(process, out, err)

    def run(
        self,
        job: str,
        env: dict[str, str],
        fault: str | None = None,
        timeout: float = 300.0,
        argv: list[str] | None = None,
    ) -> Finished:
        return self.start(job, env, fault, argv=argv).wait(timeout)

    def cli(self, argv: list[str], env: dict[str, str] | None = None) -> Finished:
        """`loraforge ARGV...` in a forked process (the launcher's entrypoint)."""
        return self.run("cli", env or {}, argv=argv)


def record(name: str, row: dict[str, Any]) -> None:
    """Append a row to $RELIABILITY_DIR/<name>.jsonl when set (RELIABILITY.md's figures come
    from there); a no-op otherwise."""
    root = os.environ.get("RELIABILITY_DIR")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
        with Path(root, f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
