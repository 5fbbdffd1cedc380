"""A job as PID 1 of its own PID namespace, as in a pod: SIGTERM runs its handler, exit 143.

The kernel delivers a signal to a namespace's PID 1 only when that process installed a handler
for it (no default action: an unhandled SIGTERM is dropped and the pod waits out its grace
period to be SIGKILLed). The job skeleton installs one; these tests show it works when the job
is PID 1 itself and when tini is PID 1 and forwards the signal (the image's ENTRYPOINT).
`unshare --pid --fork --map-root-user` gives an unprivileged PID namespace where the kernel
allows user namespaces; elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraforge.errors import EXIT_TERMINATED

ROOT = Path(__file__).parents[1]
UNSHARE = ["unshare", "--pid", "--fork", "--map-root-user"]
# A cooperative job body, like training: it stops at a safe point and its cleanup hook (a
# checkpoint, in the train job) logs a line before the exit code.
JOB = textwrap.dedent("""
    import logging, os, sys, time
    from loraforge.runner import run_job
    from loraforge.settings import TrainSettings

    def body(settings, ctx):
        ctx.cooperative()
        ctx.on_terminate.append(lambda: logging.getLogger("loraforge.job").info("hook ran"))
        print(f"ready pid={os.getpid()}", flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            ctx.check_stop()

    sys.exit(run_job(TrainSettings, body))
""")
ENV = {"LORAFORGE_BASE_MODEL": "tiny", "LORAFORGE_DATA": "d.jsonl", "LORAFORGE_LOG_FORMAT": "json"}


def _unshare_works() -> str | None:
    """None when unshare can make a PID namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"unshare cannot create a PID namespace here: {done.stderr.strip()}"
    return None


def _tini() -> str | None:
    return shutil.which("tini") or next(
        (p for p in ("/usr/bin/tini", "/sbin/tini") if Path(p).exists()), None
    )


@pytest.fixture(scope="module")
def unshare() -> list[str]:
    reason = _unshare_works()
    if reason:
        pytest.skip(reason)
    return UNSHARE


def _namespace_init(host_pid: int, timeout: float = 10.0) -> int:
    """Host PID of the process `unshare --fork` started (PID 1 of the new namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == host_pid:  # its parent is the unshare process
                return int(stat.parent.name)
        time.sleep(0.02)
    raise AssertionError(f"unshare (pid {host_pid}) started no child within {timeout}s")


def _run_terminated(command: list[str]) -> tuple[int, str, list[dict[str, object]]]:
    proc = subprocess.Popen(
        command,
        env={**os.environ, **ENV},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline().strip()
    assert ready.startswith("ready"), proc.communicate(timeout=30)[1]
    os.kill(_namespace_init(proc.pid), signal.SIGTERM)  # what the kubelet sends, to PID 1
    _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return proc.returncode, ready, lines


def test_job_as_pid_1_handles_sigterm_and_exits_143(unshare: list[str]) -> None:
    rc, ready, lines = _run_terminated([*unshare, sys.executable, "-c", JOB])
    assert ready == "ready pid=1"
    assert rc == EXIT_TERMINATED
    messages = [line["msg"] for line in lines]
    assert messages[-2:] == ["hook ran", "SIGTERM received"]
    assert lines[-1]["exit_code"] == EXIT_TERMINATED


def test_job_under_tini_gets_the_forwarded_sigterm_and_exits_143(unshare: list[str]) -> None:
    tini = _tini()
    if tini is None:
        pytest.skip("tini is not installed (the image's PID 1; `apt-get install tini`)")
    rc, ready, lines = _run_terminated([*unshare, tini, "--", sys.executable, "-c", JOB])
    assert ready == "ready pid=2"  # tini is PID 1
    assert rc == EXIT_TERMINATED  # tini exits with its child's code
    assert [line["msg"] for line in lines][-2:] == ["hook ran", "SIGTERM received"]
