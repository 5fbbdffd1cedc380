"""The skeleton every job runs in: settings -> logged (redacted) -> body -> exit code.

`run_job` is the only place that turns errors into exit codes (design table):
`PermanentError` -> 2, `TransientError` -> 75, SIGTERM -> 143 after the job's cleanup hooks,
a full disk anywhere (a temporary directory, the cache) -> 75 with one line, anything else -> 1
with a traceback. The one-line message also goes to the Kubernetes
termination log, so `kubectl describe` and `loraforge status` show why a Job failed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from loraforge.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    EXIT_UNEXPECTED,
    LoraforgeError,
    Terminated,
)
from loraforge.logs import scrub, setup_logging
from loraforge.settings.base import JobSettings, load_settings

log = logging.getLogger("loraforge.job")
S = TypeVar("S", bound=JobSettings)
TERMINATION_LOG = "/dev/termination-log"


@dataclass
class JobContext:
    """What a job body gets besides its settings: a stop flag and cleanup hooks for SIGTERM.

    A body that can stop cleanly (training: publish a checkpoint first) calls `cooperative()`
    and polls `check_stop()` at safe points; otherwise SIGTERM interrupts it at once.
    """

    stop: threading.Event = field(default_factory=threading.Event)
    on_terminate: list[Callable[[], None]] = field(default_factory=list)
    _cooperative: bool = False

    def cooperative(self) -> None:
        self._cooperative = True

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Terminated("SIGTERM received")

    def _handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        if not self._cooperative:
            raise Terminated("SIGTERM received")


def run_job(
    settings_cls: type[S], body: Callable[[S, JobContext], None], argv: list[str] | None = None
) -> int:
    """Run `body` under the job skeleton and return the process exit code."""
    early = os.environ.get("LORAFORGE_LOG_FORMAT", "auto")
    scrubber = setup_logging(early if early in ("json", "text") else "auto")  # type: ignore[arg-type]
    ctx = JobContext()
    previous = signal.signal(signal.SIGTERM, ctx._handle_sigterm)
    try:
        settings = load_settings(settings_cls)
        scrubber = setup_logging(settings.log_format)
        scrubber.add(settings.secret_values())
        log.info(f"{settings_cls.job} job starting", extra={"settings": settings.redacted()})
        body(settings, ctx)
        log.info(f"{settings_cls.job} job finished")
        return EXIT_OK
    except Terminated as exc:
        return _terminated(ctx, exc)
    except LoraforgeError as exc:
        return _fail(exc.exit_code, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _unexpected(exc)
        where = f" writing {exc.filename}" if exc.filename else ""
        return _fail(
            EXIT_TRANSIENT,
            f"no space left on the device{where}: free space or give the pod a larger volume "
            "(emptyDir sizeLimit, LORAFORGE_CACHE), then rerun",
        )
    except Exception as exc:
        return _unexpected(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unexpected(exc: Exception) -> int:
    """A bug: keep the traceback."""
    log.exception(f"unexpected error: {type(exc).__name__}: {exc}")
    _write_termination_log(f"unexpected error: {type(exc).__name__}: {exc}")
    return EXIT_UNEXPECTED


def _terminated(ctx: JobContext, exc: Terminated) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup short
    for hook in ctx.on_terminate:
        try:
            hook()
        except Exception as hook_exc:
            log.error(f"cleanup after SIGTERM failed: {hook_exc}")
    return _fail(exc.exit_code, str(exc))


def _fail(code: int, message: str) -> int:
    log.error(message, extra={"event": "exit", "exit_code": code})
    _write_termination_log(message)
    return code


def _write_termination_log(message: str) -> None:
    path = Path(TERMINATION_LOG)
    if path.is_file():  # Kubernetes mounts it; elsewhere nothing is written
        with contextlib.suppress(OSError):
            path.write_text(scrub(message)[:4000] + "\n")  # no logger filters this one


def job_main(settings_cls: type[S], body: Callable[[S, JobContext], None]) -> None:
    """Console-script entrypoint: run and exit with the code."""
    sys.exit(run_job(settings_cls, body))


__all__ = ["EXIT_PERMANENT", "JobContext", "job_main", "run_job"]
