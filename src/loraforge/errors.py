"""The two kinds of failure a job can have, and the exit codes the Job's podFailurePolicy acts on.

Library code raises `PermanentError` (bad configuration or input: retrying cannot help) or
`TransientError` (a store or hub that did not answer: a new pod may succeed). Only the job
entrypoint (`loraforge.runner`) turns them into exit codes.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PERMANENT = 2  # podFailurePolicy: FailJob
EXIT_TRANSIENT = 75  # EX_TEMPFAIL; podFailurePolicy: Count
EXIT_TERMINATED = 143  # 128 + SIGTERM; podFailurePolicy: Count
EXIT_UNEXPECTED = 1  # a bug: counted against backoffLimit


class LoraforgeError(Exception):
    """Base class; `str(err)` is the one line shown to the user."""

    exit_code = EXIT_UNEXPECTED


class PermanentError(LoraforgeError):
    """Bad configuration or input. The message names the variable or file and the fix."""

    exit_code = EXIT_PERMANENT


class TransientError(LoraforgeError):
    """Something outside the job did not answer after bounded retries; a rerun may succeed."""

    exit_code = EXIT_TRANSIENT


class Terminated(LoraforgeError):
    """SIGTERM arrived (preemption, node drain, `kubectl delete`)."""

    exit_code = EXIT_TERMINATED


class ArtifactExistsError(PermanentError):
    """The output prefix already holds a published artifact; nothing was written."""


class IntegrityError(PermanentError):
    """A published artifact's file does not match its manifest (size or sha256)."""
