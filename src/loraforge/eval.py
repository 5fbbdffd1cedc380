"""The eval job (`loraforge-eval`): settings -> inputs -> run -> publish. Built in issue #6."""

from __future__ import annotations

from loraforge.errors import PermanentError
from loraforge.runner import JobContext, job_main
from loraforge.settings import EvalSettings


def run(settings: EvalSettings, ctx: JobContext) -> None:
    raise PermanentError(
        f"the eval job is not implemented yet (issue #6); settings for run {settings.run_id} "
        "validated, nothing was written"
    )


def main() -> None:
    job_main(EvalSettings, run)
