"""Exit codes, SIGTERM and log lines of the job skeleton, through real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraforge.errors import EXIT_PERMANENT, EXIT_TERMINATED, EXIT_TRANSIENT

ROOT = Path(__file__).parents[1]
JOB = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from loraforge.errors import PermanentError, TransientError
    from loraforge.runner import run_job
    from loraforge.settings import TrainSettings

    def body(settings, ctx):
        mode = sys.argv[1]
        if mode == "transient":
            raise TransientError("s3://bkt/x: S3 endpoint unreachable after retries")
        if mode == "permanent":
            raise PermanentError("data.jsonl:3: not JSON; fix the line")
        if mode == "crash":
            raise ZeroDivisionError("boom")
        if mode == "cooperative":
            ctx.cooperative()
        ctx.on_terminate.append(lambda: Path(sys.argv[2]).write_text("checkpoint"))
        print("ready", flush=True)
        for _ in range(600):
            time.sleep(0.05)
            if mode == "cooperative" and ctx.stop.is_set():
                Path(sys.argv[2] + ".step").write_text("finished the step")
                ctx.check_stop()

    sys.exit(run_job(TrainSettings, body))
""")
ENV = {"LORAFORGE_BASE_MODEL": "tiny", "LORAFORGE_DATA": "d.jsonl", "LORAFORGE_LOG_FORMAT": "json"}


def start(mode: str, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, **ENV, **env, "AWS_SECRET_ACCESS_KEY": "never-print-this-0987"}
    return subprocess.Popen(
        [sys.executable, "-c", JOB, mode, str(tmp_path / "hook")],
        env=full,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, list[dict[str, object]]]:
    _, err = proc.communicate(timeout=60)
    assert "never-print-this-0987" not in err
    return proc.returncode, [json.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("permanent", EXIT_PERMANENT, "data.jsonl:3: not JSON; fix the line"),
        ("transient", EXIT_TRANSIENT, "s3://bkt/x: S3 endpoint unreachable after retries"),
        ("crash", 1, "unexpected error: ZeroDivisionError: boom"),
    ],
)
def test_errors_map_to_exit_codes_with_one_json_line(
    tmp_path: Path, mode: str, code: int, message: str
) -> None:
    rc, lines = finish(start(mode, tmp_path))
    assert rc == code
    assert lines[0]["msg"] == "train job starting" and lines[0]["settings"]["base_model"] == "tiny"
    assert lines[-1]["level"] == "error" and lines[-1]["msg"] == message


def test_bad_settings_exit_2_before_the_body_runs(tmp_path: Path) -> None:
    rc, lines = finish(start("permanent", tmp_path, LORAFORGE_RNAK="8"))
    assert rc == EXIT_PERMANENT
    assert [line["msg"] for line in lines] == [
        "train settings: 1 problem: LORAFORGE_RNAK is not a setting of the train job "
        "(did you mean LORAFORGE_RANK?)"
    ]


@pytest.mark.parametrize("mode", ["interrupt", "cooperative"])
def test_sigterm_runs_cleanup_then_exits_143(tmp_path: Path, mode: str) -> None:
    proc = start(mode, tmp_path)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    rc, lines = finish(proc)
    assert rc == EXIT_TERMINATED and time.monotonic() - started < 10
    assert (tmp_path / "hook").read_text() == "checkpoint"
    assert (tmp_path / "hook.step").exists() == (mode == "cooperative")
    assert lines[-1]["msg"] == "SIGTERM received"


def test_text_logs_are_readable_lines(tmp_path: Path) -> None:
    proc = start("permanent", tmp_path, LORAFORGE_LOG_FORMAT="text")
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert "error" in last and last.endswith(
        "error   data.jsonl:3: not JSON; fix the line  exit_code=2"
    )
    assert not last.startswith("{")


def test_the_console_scripts_are_installed_and_validate_first(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    for job in ("train", "edit", "eval"):
        env = {**os.environ, "LORAFORGE_LOG_FORMAT": "json", "LORAFORGE_RANK": "0"}
        env = {
            k: v
            for k, v in env.items()
            if not k.startswith("LORAFORGE_") or k in ("LORAFORGE_LOG_FORMAT", "LORAFORGE_RANK")
        }
        done = subprocess.run(
            [bindir / f"loraforge-{job}"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == EXIT_PERMANENT
        assert "LORAFORGE_BASE_MODEL is required" in done.stderr
