"""Runs generated code: one process per program, limited, isolated, killed with its children.

The eval job never runs a completion in its own process. `run_many` runs each program as
`python -I -B sandbox.py` (this file, standard library only) on a bounded thread pool; the
process reads the program from stdin and runs it in a forked child under these layers:

- **Its own session and process group** (`start_new_session`): when the wall-clock timeout is
  up, and after every run for what it left behind, the whole group gets SIGKILL (`os.killpg`).
- **Resource limits**, set in the child before the program runs: CPU seconds (`RLIMIT_CPU`),
  address space (`RLIMIT_AS`), processes (`RLIMIT_NPROC`, so a fork bomb stops at `PROCESSES`),
  file size (`RLIMIT_FSIZE`, which also bounds its stderr), open files, no core dumps.
- **Namespaces where the kernel allows** (`unshare`, probed once by `probe`): a user namespace, an
  empty network namespace (a down loopback and nothing else) and a PID namespace whose init is the
  supervisor: when it exits, every process the program started dies with it, and the program's
  `/proc` shows none of the job's processes. Kubernetes' `RuntimeDefault` seccomp profile is
  expected to refuse `unshare` to an unprivileged pod, whose NetworkPolicy (k8s/base) lets it
  reach DNS and HTTP(S) for S3 and the hub: there the audit hook below is what keeps programs
  off the network.
- **Not root**: when the job runs as root (RLIMIT_NPROC does not bind root), programs run as
  `nobody`.
- **A throwaway working directory** (also HOME and TMPDIR), removed afterwards, and an
  **environment of PATH and LANG** (plus single-thread BLAS settings): no `AWS_*`, `HF_*`,
  `LORAFORGE_*` or any other variable of the job's.
- **An audit hook** (PEP 578), always installed before the program runs: no sockets, no new
  programs (exec, spawn, `subprocess`, `os.system`), no signals to other processes, no `ctypes`,
  no `gc` object walks, no rlimit changes; files are read only under the Python installation and
  the working directory and written only in the working directory (so `/proc/*/environ` and
  mounted secrets stay closed even without namespaces). It is a best-effort second layer: a
  Python-level check, not a kernel boundary, and it does not make scoring robust against code
  written to fool this harness.

A program passes when it runs to its end and exits normally; `sys.exit`, `exit()` and
`os._exit` count as failures, as in OpenAI's human-eval.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import json
import math
import os
import posix
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

Status = Literal["passed", "failed", "timeout", "killed"]
PROCESSES = 64  # default RLIMIT_NPROC of a program: forks beyond it fail
OPEN_FILES = 256
FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: largest file (and stderr) a program may write
EXIT_FAILED = 3  # the child's exit status after the program raised
KILL_GRACE_S = 1.0  # CPU seconds between SIGXCPU and SIGKILL
_STDERR_TAIL = 4096
# The environment of every program: nothing of the job's, BLAS kept to one thread (RLIMIT_AS).
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_UNSHARE_FULL = (
    "--user",
    "--map-root-user",
    "--net",
    "--pid",
    "--fork",
    "--mount-proc",
    "--kill-child",
)


@dataclass(frozen=True)
class Limits:
    """What one program may use: wall-clock seconds, address space, CPU seconds (default: the
    timeout rounded up, so a busy loop and a sleeping one end alike), processes."""

    timeout: float = 10.0
    memory_mb: int = 2048
    cpu: int | None = None
    processes: int = PROCESSES

    @property
    def cpu_seconds(self) -> int:
        return self.cpu or max(1, math.ceil(self.timeout))


@dataclass(frozen=True)
class Isolation:
    """How programs are started: a command prefix (`unshare ...` or none) and the user."""

    prefix: tuple[str, ...]
    uid: int | None  # run as this user (nobody when the job is root), None: the job's own
    gid: int | None
    description: str
    python: str = sys.executable  # interpreter the programs run under
    namespaces: frozenset[str] = frozenset()  # of {"user", "net", "pid"}
    guard: bool = True  # the audit hook; off only in tests that probe the kernel layers alone


@dataclass(frozen=True)
class Result:
    """How one program ended. `detail`: the exception line, the limit hit or the signal."""

    status: Status
    detail: str
    wall_s: float
    cpu_s: float | None = None  # user + system CPU of the program's process
    max_rss_mb: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- the job's side -----------------------------------------------------------------------------


def _drop_to() -> tuple[int | None, int | None]:
    """(uid, gid) of `nobody` when the job is root, else (None, None): stay the job's user."""
    if os.geteuid() != 0:
        return None, None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


class SandboxUnavailable(RuntimeError):
    """No interpreter could run a trivial program in the sandbox here."""


def _interpreters() -> list[str]:
    """The job's interpreter first; when programs run as `nobody`, the venv's link may point
    into a directory only root can enter, so the real binary and the system's come next."""
    found = [sys.executable, os.path.realpath(sys.executable), shutil.which("python3") or ""]
    found += ["/usr/local/bin/python3", "/usr/bin/python3"]
    return list(dict.fromkeys(p for p in found if p and os.path.exists(p)))


@functools.cache
def probe() -> Isolation:
    """The strongest isolation that starts here: user + network + PID namespaces, then user +
    network namespaces, then none (resource limits and the audit hook)."""
    uid, gid = _drop_to()
    who = f", as uid {uid}" if uid is not None else ""
    unshare = shutil.which("unshare")
    prefixes: list[tuple[tuple[str, ...], str, frozenset[str]]] = []
    if unshare:
        prefixes += [
            (
                (unshare, *_UNSHARE_FULL, "--"),
                "user, network and PID namespaces (unshare)",
                frozenset({"user", "net", "pid"}),
            ),
            (
                (unshare, "--user", "--map-root-user", "--net", "--"),
                "user and network namespaces (unshare)",
                frozenset({"user", "net"}),
            ),
        ]
    why = "no unshare binary" if not unshare else "the kernel or seccomp refuses unshare"
    none = f"no namespaces ({why}): limits and audit hook only"
    prefixes.append(((), none, frozenset()))
    for python in _interpreters():
        plain = Isolation((), uid, gid, "", python=python)
        if not _starts(plain):
            continue
        for prefix, what, kinds in prefixes:
            isolation = dataclasses.replace(
                plain, prefix=prefix, description=what + who, namespaces=kinds
            )
            if not prefix or _starts(isolation):
                if python != sys.executable:
                    isolation = dataclasses.replace(
                        isolation, description=f"{isolation.description}, python {python}"
                    )
                return isolation
    raise SandboxUnavailable(
        f"no Python interpreter ({', '.join(_interpreters())}) runs a program in the sandbox"
        + (f" as uid {uid}" if uid is not None else "")
    )


def _starts(isolation: Isolation) -> bool:
    try:
        return run_program("pass", Limits(timeout=30.0, memory_mb=512), isolation).passed
    except OSError:  # the interpreter or unshare cannot be executed as that user
        return False


def run_program(source: str, limits: Limits, isolation: Isolation | None = None) -> Result:
    """Run `source` in a fresh sandboxed process; never raises for anything the program does."""
    iso = isolation or probe()
    work = Path(tempfile.mkdtemp(prefix="loraforge-sandbox-"))
    try:
        if iso.uid is not None:
            os.chown(work, iso.uid, iso.gid if iso.gid is not None else -1)
        with tempfile.TemporaryFile() as stderr, tempfile.TemporaryFile() as verdict:
            return _run(source, limits, iso, work, stderr, verdict)
    finally:
        _remove(work)


def _run(
    source: str, limits: Limits, iso: Isolation, work: Path, stderr: Any, verdict: Any
) -> Result:
    spec = {
        "cpu": limits.cpu_seconds,
        "memory": limits.memory_mb * 2**20,
        "processes": limits.processes,
        "verdict_fd": verdict.fileno(),
        "work": str(work),
        "guard": iso.guard,
    }
    command = [*iso.prefix, iso.python, "-I", "-B", __file__, json.dumps(spec)]
    env = _ENV | {"HOME": str(work), "TMPDIR": str(work)}
    ids: dict[str, Any] = {}
    if iso.uid is not None:
        ids = {"user": iso.uid, "group": iso.gid, "extra_groups": []}
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=work,
        env=env,
        pass_fds=(verdict.fileno(),),
        start_new_session=True,
        **ids,
    )
    timed_out = False
    try:
        proc.communicate(source.encode("utf-8", "replace"), timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)  # on timeout, and whatever it left running
        proc.wait()
    wall = time.monotonic() - start
    if timed_out:
        return Result("timeout", f"wall-clock limit ({limits.timeout:g} s)", wall)
    found = _read_verdict(verdict)
    if found is None:  # killed before its supervisor could say how it ended
        return Result("killed", _last_line(stderr) or f"exit status {proc.returncode}", wall)
    status, detail = found["status"], found["detail"]
    if status == "failed" and not detail:
        detail = _last_line(stderr) or "failed"
    return Result(status, detail, wall, found["cpu_s"], found["max_rss_mb"])


def _remove(work: Path) -> None:
    """Delete the working directory, whatever permissions the program left on its subfolders."""
    for root, folders, _ in os.walk(work):
        for folder in folders:  # before os.walk descends into it
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, folder), 0o700)
    shutil.rmtree(work, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, signal.SIGKILL)


def _read_verdict(file: Any) -> dict[str, Any] | None:
    file.seek(0)
    lines = file.read().decode("utf-8", "replace").strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def _last_line(file: Any) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - _STDERR_TAIL))
    lines = [ln.strip() for ln in file.read().decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def default_workers() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def run_many(
    sources: Sequence[str],
    limits: Limits,
    workers: int | None = None,
    on_done: Callable[[int], None] | None = None,
    isolation: Isolation | None = None,
) -> list[Result]:
    """Every program in its own sandbox, `workers` at a time; results in input order.

    `on_done(finished)` is called from the calling thread as programs finish. An interrupt
    (SIGTERM in the job) cancels what has not started and waits for what runs (each at most
    `limits.timeout`).
    """
    iso = isolation or probe()
    results: list[Result | None] = [None] * len(sources)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers())
    try:
        futures = {pool.submit(run_program, s, limits, iso): i for i, s in enumerate(sources)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_done is not None:
                on_done(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


# --- the program's side: this file run as `python -I -B sandbox.py SPEC` ------------------------


def _supervise(spec: dict[str, Any]) -> None:
    """Read the program, run it in a forked child, write how it ended to the verdict fd.

    Under a PID namespace this process is its init: when it exits, every process left dies.
    """
    source = sys.stdin.buffer.read().decode("utf-8", "replace")
    verdict_fd = int(spec["verdict_fd"])
    hard_exit = os._exit  # the child replaces os._exit before the program runs
    pid = os.fork()
    if pid == 0:
        try:
            os.close(verdict_fd)  # the program cannot forge a verdict
            _child(source, spec)
        finally:
            hard_exit(70)  # only if the harness itself failed
    _, status, usage = os.wait4(pid, 0)
    verdict = _verdict(status, usage, int(spec["cpu"]))
    os.write(verdict_fd, (json.dumps(verdict) + "\n").encode())
    os._exit(0)


def _verdict(status: int, usage: resource.struct_rusage, cpu_limit: int) -> dict[str, Any]:
    cpu = usage.ru_utime + usage.ru_stime
    found: dict[str, Any] = {"cpu_s": round(cpu, 3), "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == 0:
            return found | {"status": "passed", "detail": ""}
        return found | {"status": "failed", "detail": "" if code == EXIT_FAILED else f"exit {code}"}
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.05):
        detail = f"CPU time limit ({cpu_limit} s)"
    elif sig == signal.SIGXFSZ:
        detail = f"file size limit ({FILE_BYTES // 2**20} MiB)"
    elif sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        detail = f"crashed ({signal.Signals(sig).name})"
    else:
        detail = f"killed by {signal.Signals(sig).name}"
    return found | {"status": "killed", "detail": detail}


def _child(source: str, spec: dict[str, Any]) -> None:
    """Limits, the audit hook, then the program; exits 0 only if it ran to its end."""
    exit_now = os._exit
    cpu = int(spec["cpu"])
    _lower(resource.RLIMIT_CPU, cpu, cpu + math.ceil(KILL_GRACE_S))
    _lower(resource.RLIMIT_AS, int(spec["memory"]))
    _lower(resource.RLIMIT_NPROC, int(spec["processes"]))
    _lower(resource.RLIMIT_FSIZE, FILE_BYTES)
    _lower(resource.RLIMIT_NOFILE, OPEN_FILES)
    _lower(resource.RLIMIT_CORE, 0)
    if spec["guard"]:
        sys.addaudithook(_guard(str(spec["work"])))
    os._exit = posix._exit = _no_exit  # a program ending the process early has not passed
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "<program>", "exec"), namespace)
        sys.stdout.flush()
    except BaseException as exc:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        sys.stderr.write("\n" + line[:500] + "\n")
        sys.stderr.flush()
        exit_now(EXIT_FAILED)
    exit_now(0)


def _no_exit(status: int) -> NoReturn:
    raise SystemExit(f"os._exit({status}) called")


def _lower(limit: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit to (soft, hard), never above the hard limit already in force."""
    _, current = resource.getrlimit(limit)
    hard = soft if hard is None else hard
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(limit, (soft, hard))


_BLOCKED = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.startfile",
        "os.forkpty",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "resource.setrlimit",
        "resource.prlimit",
        "webbrowser.open",
    }
)
_BLOCKED_PREFIXES = ("socket.", "ctypes.")
_BLOCKED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})
# audit event -> (indices of path arguments, index of the dir_fd argument or None)
_WRITES: dict[str, tuple[tuple[int, ...], int | None]] = {
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.mkdir": ((0,), 2),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.utime": ((0,), 3),
    "os.truncate": ((0,), None),
    "shutil.rmtree": ((0,), 1),
    "os.rename": ((0, 1), 2),
    "os.link": ((0, 1), 2),
    "os.symlink": ((1,), 2),
}
_READS = frozenset({"os.listdir", "os.scandir"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guard(work: str) -> Callable[[str, tuple[Any, ...]], None]:
    """The audit hook: refuses the events above and file access outside the allowed trees."""
    realpath, fsdecode, isabs, join, readlink = (
        os.path.realpath,
        os.fsdecode,
        os.path.isabs,
        os.path.join,
        os.readlink,
    )  # bound now: the program may rebind the modules' names, not these
    blocked, blocked_prefixes, blocked_imports = _BLOCKED, _BLOCKED_PREFIXES, _BLOCKED_IMPORTS
    writes_at, reads, write_flags = dict(_WRITES), _READS, _WRITE_FLAGS
    work = realpath(work)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    readable = (*sorted({realpath(p) for p in prefixes} - {"/"}), work)
    devices = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})

    def resolve(path: Any, dir_fd: Any) -> str:
        name: str = fsdecode(path)
        if not isabs(name) and isinstance(dir_fd, int) and dir_fd >= 0:
            name = join(readlink(f"/proc/self/fd/{dir_fd}"), name)
        return realpath(name)

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        return path in devices or any(path == r or path.startswith(r + os.sep) for r in roots)

    def refuse(what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in blocked or event.startswith(blocked_prefixes):
            refuse(event)
        elif event == "import" and args[0] in blocked_imports:
            refuse(f"importing {args[0]}")
        elif event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            resolved = resolve(path, None)
            if not inside(resolved, (work,) if writes else readable):
                refuse(f"{'writing' if writes else 'reading'} {resolved}")
        elif event in reads:
            if args and isinstance(args[0], (str, bytes, os.PathLike)):
                resolved = resolve(args[0], None)
                if not inside(resolved, readable):
                    refuse(f"listing {resolved}")
        elif event in writes_at:
            paths, fd_at = writes_at[event]
            dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
            for i in paths:
                if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)):
                    resolved = resolve(args[i], dir_fd)
                    if not inside(resolved, (work,)):
                        refuse(f"{event} on {resolved}")

    return hook


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]))
