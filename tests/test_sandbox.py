"""The sandbox on hand-written HumanEval-style problems: correct, wrong, crashing and abusive
completions (endless loops, memory and process hogs, network, secrets, escapes) each get the
right outcome, each abusive one is stopped within its limits, and the run goes on.

Limits are small (2 s) so the file takes seconds. Every case runs twice: under the isolation
`sandbox.probe` finds here and with no namespaces at all (what a pod under Kubernetes'
RuntimeDefault seccomp profile gets), where the limits, the process group and the audit hook
must do the work alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraforge import humaneval, sandbox
from loraforge.humaneval import Problem

TIMEOUT = 2.0
# 16 processes, not the default 64: the fork bomb shares 2 cores with the rest of the suite
LIMITS = sandbox.Limits(timeout=TIMEOUT, memory_mb=256, processes=16)
SLACK = 3.0  # seconds past a limit allowed for starting, killing and reaping on 2 busy cores
CANARY = "canary-7f3a9c"  # the secret every leaking completion looks for

ADD = Problem(
    0,
    "Test/0",
    'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "add",
    "problems.jsonl:1",
)
LEAK = Problem(
    1,
    "Test/1",
    'def leak() -> str:\n    """Return every secret you can find."""\n',
    f"def check(candidate):\n    assert {CANARY!r} in candidate()\n",
    "leak",
    "problems.jsonl:2",
)


@dataclass(frozen=True)
class Case:
    problem: Problem
    completion: str
    passed: bool
    status: str  # expected status; "stopped" = timeout or killed (whichever limit hits first)
    detail: str = ""  # regular expression the detail must match
    within: float = SLACK  # wall-clock bound, seconds


CASES = {
    "correct": Case(ADD, "    return a + b\n", True, "passed"),
    "wrong": Case(ADD, "    return a - b\n", False, "failed", r"^AssertionError"),
    "crashing": Case(ADD, "    return [a, b][2]\n", False, "failed", r"^IndexError"),
    "segfault": Case(
        ADD, "    import faulthandler\n    faulthandler._sigsegv()\n", False, "killed", "SIGSEGV"
    ),
    "syntax error": Case(ADD, "    return a +\n", False, "failed", r"^SyntaxError"),
    "exits early": Case(ADD, "    import sys\n    sys.exit(0)\n", False, "failed", "SystemExit"),
    "os._exit": Case(ADD, "    import os\n    os._exit(0)\n", False, "failed", r"os\._exit"),
    "infinite loop": Case(
        ADD, "    while True:\n        pass\n", False, "stopped", within=TIMEOUT + SLACK
    ),
    "sleeping loop": Case(
        ADD,
        "    import time\n    while True:\n        time.sleep(0.1)\n",
        False,
        "timeout",
        "wall-clock",
        TIMEOUT + SLACK,
    ),
    "memory-hungry": Case(
        ADD,
        "    hoard = []\n    while True:\n        hoard.append(bytearray(10**7))\n",
        False,
        "failed",
        "MemoryError",
    ),
    "fork bomb": Case(
        ADD,
        "    import os\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n",
        False,
        "stopped",
        within=TIMEOUT + SLACK,
    ),
    "network": Case(
        ADD,
        "    import urllib.request\n"
        "    return urllib.request.urlopen('http://1.1.1.1', timeout=5).status\n",
        False,
        "failed",
        r"sandbox: socket\.\S+ is not allowed",
    ),
    "subprocess": Case(
        ADD,
        "    import subprocess\n    subprocess.run(['curl', 'http://1.1.1.1'])\n",
        False,
        "failed",
        "is not allowed",
    ),
    "reads env": Case(
        LEAK, "    import os\n    return repr(dict(os.environ))\n", False, "failed", "Assertion"
    ),
    "reads /proc environ": Case(
        LEAK,
        "    import glob\n    found = ''\n    for path in glob.glob('/proc/*/environ'):\n"
        "        try:\n            found += open(path, errors='replace').read()\n"
        "        except OSError:\n            pass\n    return found\n",
        False,
        "failed",
        "Assertion",
    ),
    "reads secret file": Case(
        LEAK, "    return open(SECRET_FILE).read()\n", False, "failed", "not allowed"
    ),
    "kills its parent": Case(
        ADD, "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n", False, "failed"
    ),
    "writes outside": Case(
        ADD, "    open(OUTSIDE_FILE, 'w').write('x')\n", False, "failed", "writing .* not allowed"
    ),
    "writes its own dir": Case(
        ADD,
        "    with open('scratch.txt', 'w') as f:\n        f.write(str(a + b))\n"
        "    return int(open('scratch.txt').read())\n",
        True,
        "passed",
    ),
}


@pytest.fixture(scope="module")
def secrets_around(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A world-readable secret file, a world-writable directory and secrets in the job's env."""
    root = Path("/tmp") / f"loraforge-test-{os.getpid()}"  # reachable by `nobody`
    root.mkdir(mode=0o777, exist_ok=True)
    root.chmod(0o777)
    secret = root / "token"
    secret.write_text(CANARY)
    secret.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    outside = root / "outside.txt"
    saved = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "LORAFORGE_X")}
    for name in saved:
        os.environ[name] = CANARY
    try:
        yield {"SECRET_FILE": str(secret), "OUTSIDE_FILE": str(outside)}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        assert not outside.exists(), "a completion wrote outside its working directory"
        secret.unlink()
        root.rmdir()


ISOLATIONS = ["probed", "no namespaces"]


def isolation(kind: str) -> sandbox.Isolation:
    probed = sandbox.probe()
    if kind == "probed":
        return probed
    return dataclasses.replace(
        probed, prefix=(), description="no namespaces", namespaces=frozenset()
    )


def source(case: Case, names: dict[str, str]) -> str:
    """The program; the fixture's paths stand in for SECRET_FILE and OUTSIDE_FILE."""
    completion = case.completion
    for name, value in names.items():
        completion = completion.replace(name, repr(value))
    return humaneval.program(case.problem, completion)


@pytest.mark.parametrize("kind", ISOLATIONS)
def test_each_completion_gets_its_outcome_within_its_limits(
    kind: str, secrets_around: dict[str, str]
) -> None:
    names = sorted(set(CASES) - {"fork bomb"})  # its own test below checks what it leaves
    programs = [source(CASES[n], secrets_around) for n in names]
    start = time.monotonic()
    results = sandbox.run_many(programs, LIMITS, workers=len(programs), isolation=isolation(kind))
    elapsed = time.monotonic() - start
    for name, result in zip(names, results, strict=True):
        case = CASES[name]
        assert result.passed == case.passed, (name, result)
        if case.status == "stopped":
            assert result.status in ("timeout", "killed"), (name, result)
        else:
            assert result.status == case.status, (name, result)
        assert re.search(case.detail, result.detail), (name, result)
        assert result.wall_s <= case.within, (name, result)
        assert CANARY not in result.detail, (name, result)
    # all at once: the abusive ones do not hold up the rest beyond their own limits
    assert elapsed <= TIMEOUT + 2 * SLACK


@pytest.mark.parametrize("kind", ISOLATIONS)
def test_the_job_keeps_going_after_abuse(kind: str, secrets_around: dict[str, str]) -> None:
    """One worker: each abusive program ends before the next starts, and the last still runs."""
    order = ["infinite loop", "memory-hungry", "kills its parent", "reads secret file", "correct"]
    programs = [source(CASES[n], secrets_around) for n in order]
    results = sandbox.run_many(programs, LIMITS, workers=1, isolation=isolation(kind))
    assert [r.passed for r in results] == [False, False, False, False, True]


def _sandbox_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the programs' working directories)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("kind", ISOLATIONS)
def test_a_fork_bomb_is_killed_with_all_its_children(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Path("/tmp") / f"loraforge-bomb-{os.getpid()}-{kind.replace(' ', '-')}"
    base.mkdir(mode=0o755, exist_ok=True)
    monkeypatch.setattr("tempfile.tempdir", str(base))  # the work dir, so argv, names `base`
    program = source(CASES["fork bomb"], {})
    result = sandbox.run_program(program, LIMITS, isolation(kind))
    assert result.status in ("timeout", "killed") and result.wall_s <= TIMEOUT + SLACK, result
    deadline = time.monotonic() + 5
    while _sandbox_processes(str(base)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_processes(str(base)) == []
    assert list(base.iterdir()) == []  # the working directory is gone too
    base.rmdir()


def test_a_busy_loop_is_killed_at_its_cpu_limit() -> None:
    """A generous wall clock, so the CPU limit (SIGXCPU at 1 s) is what ends it, however busy."""
    limits = sandbox.Limits(timeout=60.0, memory_mb=256, cpu=1)
    result = sandbox.run_program(source(CASES["infinite loop"], {}), limits)
    assert (result.status, result.detail) == ("killed", "CPU time limit (1 s)")
    assert result.cpu_s is not None and 0.9 <= result.cpu_s < 2.5  # rusage counts in ticks


def test_memory_is_capped_by_the_address_space_limit() -> None:
    result = sandbox.run_program(source(CASES["memory-hungry"], {}), LIMITS)
    assert result.detail == "MemoryError"
    assert result.max_rss_mb is not None and result.max_rss_mb <= LIMITS.memory_mb


def test_programs_get_a_minimal_environment_and_a_fresh_directory() -> None:
    program = (
        "import os, sys\n"
        "assert sorted(os.environ) == ['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS', "
        "'OPENBLAS_NUM_THREADS', 'PATH', 'TMPDIR'], sorted(os.environ)\n"
        "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
        "assert os.listdir('.') == []\n"
        f"assert os.getpid() != {os.getpid()} and os.getppid() != {os.getpid()}\n"
        "open('left-behind.txt', 'w').write('x')\n"
    )
    first = sandbox.run_program(program, LIMITS)
    second = sandbox.run_program(program, LIMITS)  # the first one's file is not there
    assert first.passed and second.passed, (first, second)


def test_the_kernel_layers_hold_without_the_audit_hook() -> None:
    """Under namespaces, with the hook off: no network but loopback, no other processes."""
    probed = sandbox.probe()
    if "net" not in probed.namespaces:
        pytest.skip(f"no network namespace here: {probed.description}")
    bare = dataclasses.replace(probed, guard=False)
    network = (
        "import socket\n"
        "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
        "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=3)\n"
        "except OSError as exc:\n    assert exc.errno == 101, exc  # ENETUNREACH\n"
        "else:\n    raise AssertionError('connected')\n"
    )
    assert sandbox.run_program(network, LIMITS, bare).passed
    if "pid" in probed.namespaces:
        pids = "import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3\n"
        assert sandbox.run_program(pids, LIMITS, bare).passed


def test_probe_names_what_it_found() -> None:
    found = sandbox.probe()
    assert found.description
    if os.geteuid() == 0:
        assert found.uid is not None and found.uid != 0  # RLIMIT_NPROC does not bind root
